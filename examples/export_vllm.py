"""Export MoRA adapters for vLLM: ``moraft export-lora`` on each, a check of what vLLM's LoRA loader needs, and the
``vllm serve`` command that serves them all on one base model.

    python examples/export_vllm.py path/to/adapters/ lora/                 # every adapter directory in the folder
    python examples/export_vllm.py path/to/adapters/ lora/ --rank 256      # rotation adapters: truncated SVD

Each export is ``moraft.export_lora`` (what ``moraft export-lora ADAPTER OUT`` runs): sharing, truncation and
single-block decouple adapters become an exact LoRA of rank r̂; rotation adapters need ``--rank`` and become the
best rank-N approximation, with each module's error printed. Each exported directory is then checked against what
vLLM's LoRA loader accepts (``vllm/lora/peft_helper.py``): ``peft_type`` LORA with ``r``, ``lora_alpha`` and
``target_modules``; no bias, no ``modules_to_save``, no DoRA; every module's ``lora_A`` (r, k) and ``lora_B`` (d, r)
weights present; a rank within vLLM's largest ``--max-lora-rank`` (512). The printed command uses the smallest
``--max-lora-rank`` vLLM offers that holds every export.

What is not done here: vLLM itself is not run (it needs a GPU, and it is not a dependency of moraft). The checks
above are the loader's rules as read from vLLM's source, not a load by vLLM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors import safe_open

import moraft
from moraft.errors import UserError

VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def adapter_dirs(path: Path) -> list[Path]:
    """``path`` itself when it is an adapter directory, else every adapter directory directly inside it."""
    if (path / "adapter_config.json").is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / "adapter_config.json").is_file())
    if not found:
        raise SystemExit(f"export_vllm: no adapter directory (with adapter_config.json) in {path}")
    return found


def check_for_vllm(lora_dir: Path) -> int:
    """Raise ``ValueError`` naming what vLLM's LoRA loader would refuse in ``lora_dir``; return its rank."""
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    problems += [f"{key} is missing" for key in ("r", "lora_alpha", "target_modules") if config.get(key) is None]
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (vLLM needs 'none')")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set (vLLM supports none)")
    if config.get("use_dora"):
        problems.append("use_dora is set (vLLM does not support DoRA)")
    rank = config.get("r") or 0
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"rank {rank} is above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")
    with safe_open(str(lora_dir / "adapter_model.safetensors"), "pt") as weights:
        shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    modules = {key.rsplit(".lora_", 1)[0] for key in shapes if ".lora_" in key}
    if not modules or len(modules) * 2 != len(shapes):
        problems.append(f"expected only lora_A/lora_B weights, found {sorted(shapes)[:4]}...")
    for module in sorted(modules):
        a, b = shapes.get(f"{module}.lora_A.weight"), shapes.get(f"{module}.lora_B.weight")
        if a is None or b is None or a[0] != rank or b[1] != rank:
            problems.append(f"{module}: lora_A {a} and lora_B {b} are not (r, k) and (d, r) with r={rank}")
    if problems:
        raise ValueError(f"{lora_dir}: " + "; ".join(problems))
    return rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", type=Path, help="an adapter directory, or a folder of them")
    parser.add_argument("out", type=Path, help="where the LoRA exports go, one directory per adapter")
    parser.add_argument("--rank", type=int, help="export at this rank (needed for rotation adapters)")
    parser.add_argument("--base", help="the base model directory, when the adapters do not name a local one")
    args = parser.parse_args()

    ranks, base = {}, args.base
    for adapter in adapter_dirs(args.adapters):
        out = args.out / adapter.name
        print(f"$ moraft export-lora {adapter} {out}" + (f" --rank {args.rank}" if args.rank else ""))
        try:
            export = moraft.export_lora(adapter, out, rank=args.rank, base=args.base, overwrite=True)
        except UserError as err:
            sys.exit(f"export_vllm: {adapter.name}: {err}")
        worst = max(export.errors.values(), default=0.0)
        print(f"  rank {export.rank}; largest relative error {worst:.2e}" + (" (exact)" if worst == 0 else ""))
        ranks[adapter.name] = check_for_vllm(out)
        print("  vLLM's LoRA loader requirements: met")
        base = base or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")

    max_rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= max(ranks.values()))
    modules = " ".join(f"{name}={args.out / name}" for name in ranks)
    print("\nServe every export on one base with vLLM (not run here):")
    print(f"vllm serve {base or 'path/to/base-model'} --enable-lora --max-lora-rank {max_rank} \\\n"
          f"    --lora-modules {modules}")


if __name__ == "__main__":
    main()
