"""MoRA through plain PEFT calls: build a model, add MoRA, train a few steps, save, reload, merge.

Nothing is downloaded: the base is a small LLaMA built from a config (swap in
``AutoModelForCausalLM.from_pretrained(...)`` for a real one). Each step is checked, and the script exits with an
error if one fails:

1. ``get_peft_model(base, MoraConfig(...))`` trains only M (every other weight stays frozen);
2. training lowers the loss on a fixed batch;
3. ``save_pretrained`` writes the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, M only), and
   ``PeftModel.from_pretrained`` on a fresh copy of the base gives the same logits;
4. ``merge_and_unload()`` gives a plain transformers model with the same logits (within float32 rounding).

    python examples/peft_quickstart.py                         # rotation, r=8, 30 steps, writes runs/peft-quickstart
    python examples/peft_quickstart.py --compression sharing --steps 5 --out /tmp/quickstart
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import moraft  # registers MoRA with PEFT
from moraft import MoraConfig


def build_base(out: Path, hidden: int, seed: int) -> Path:
    """A small random-init LLaMA, saved so that it can be reloaded fresh (as a real base would be)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"peft_quickstart: {what}")
    print(f"ok: {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/peft-quickstart", help="where the base, adapter and merged model go")
    parser.add_argument("--compression", default="rotation", choices=moraft.COMPRESSIONS)
    parser.add_argument("--r", type=int, default=8, help="the LoRA rank whose parameter budget MoRA matches")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)

    base_dir = build_base(out / "base", args.hidden, args.seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        MoraConfig(r=args.r, compression=args.compression, target_modules="all-linear"),
    )
    model.print_trainable_parameters()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    check(bool(trainable) and all("mora_M" in name for name in trainable), "only MoRA's M is trainable")

    # a fixed batch of random tokens to memorize: enough to see the adapter learn
    generator = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, 256, (8, 32), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(args.steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(f"loss: {losses[0]:.4f} at step 1, {losses[-1]:.4f} at step {args.steps}")
    check(losses[-1] < losses[0], "training lowered the loss")

    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch).logits
    model.save_pretrained(out / "adapter")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    check(config["peft_type"] == "MORA" and (out / "adapter" / "adapter_model.safetensors").is_file(),
          f"adapter saved to {out / 'adapter'}")

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    with torch.no_grad():
        check(torch.equal(reloaded(input_ids=batch).logits, trained), "the reloaded adapter gives the same logits")

    merged = reloaded.merge_and_unload()
    merged.save_pretrained(out / "merged")
    with torch.no_grad():
        error = (merged(input_ids=batch).logits - trained).abs().max().item()
    check(error < 1e-4, f"the merged model gives the same logits (max difference {error:.1e}); saved to "
          f"{out / 'merged'}")


if __name__ == "__main__":
    main()
