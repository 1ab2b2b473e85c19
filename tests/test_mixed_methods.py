"""One MoRA adapter whose method is chosen per module (``MoraConfig(layer_methods={regex: "lora" | "dora"})``):
equal to PEFT's own LoRA and DoRA layers, in mixed-adapter batches, beside other named adapters, through
``moraft merge``, ``moraft export-lora``, ``moraft serve``, ReMoRA's restarts and ``moraft train``. The invariant
columns (merge, save/load, gradients, ...) run on the mixed rows of tests/test_invariants.py."""

from __future__ import annotations

import json
import warnings
from functools import partial

import httpx
import pytest
import torch
from helpers import MoraftServe, load_model, reference, run_cli, tiny_flags
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from moraft import MoraConfig
from moraft.errors import UserError
from moraft.interop import export_lora, merge_adapter
from moraft.testing import char_tokenizer, input_ids, logits, randomize_adapter, save_adapter, tiny_gpt2, tiny_llama
from moraft.train.methods import merge_and_restart

LLAMA = partial(tiny_llama, hidden_size=64, num_layers=2)
GPT2 = partial(tiny_gpt2, hidden_size=48, num_layers=2)
# MoRA on layer 0, DoRA on layer 1's MLP, LoRA on layer 1's attention
MIXED = {r"layers\.1\.mlp\..*": "dora", r"layers\.1\.self_attn\..*": "lora"}


def mixed_config(**overrides) -> MoraConfig:
    return MoraConfig(**{"r": 4, "target_modules": "all-linear", "layer_methods": MIXED, "lora_alpha": 6, **overrides})


# -- the config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(layer_methods={"q_proj": "vera"}), "layer_methods['q_proj']='vera' is not one of lora, dora"),
        (dict(layer_methods={"q_proj(": "lora"}), "layer_methods key 'q_proj(' is not a valid regex"),
        (dict(layer_methods=["q_proj"]), "layer_methods=['q_proj'] is invalid"),
        (dict(layer_methods={"q_proj": "lora"}, lora_alpha=0), "lora_alpha=0 is invalid"),
        (dict(layer_methods={"q_proj": "lora"}, use_rslora="yes"), "use_rslora='yes' is invalid"),
    ],
)
def test_bad_layer_methods_are_refused(options, expected):
    with pytest.raises(UserError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        MoraConfig(r=4, **options)


def test_lora_options_without_lora_modules_warn():
    with pytest.warns(UserWarning, match="lora_alpha and use_rslora only apply"):
        MoraConfig(r=4, lora_alpha=8)


def test_a_key_matching_no_module_is_refused():
    """Keys match the end of the module name, as rank_pattern's: 'layers\\.1\\.' alone matches nothing."""
    with pytest.raises(UserError, match=r"layer_methods key 'layers\\\\.1\\\\.' matches none of the adapted modules"):
        get_peft_model(LLAMA(), mixed_config(layer_methods={r"layers\.1\.": "dora"}))


# -- the math: PEFT's own LoRA and DoRA -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_and_dora_modules_equal_peft(arch, method):
    """The same seed gives the same initial A (and magnitude) as PEFT's LoraConfig; with PEFT's random weights copied
    in, the logits and merge_and_unload's weights are PEFT's."""
    make, targets = (LLAMA, "all-linear") if arch == "llama" else (GPT2, ["c_attn", "c_proj", "c_fc"])
    fan = arch == "gpt2"
    torch.manual_seed(5)
    ours = get_peft_model(make(), MoraConfig(r=4, target_modules=targets, layer_methods={".*": method}, lora_alpha=6))
    torch.manual_seed(5)
    peft = get_peft_model(make(), LoraConfig(r=4, target_modules=targets, lora_alpha=6, use_dora=method == "dora",
                                             fan_in_fan_out=fan))
    rename = {"lora_A": "mora_lora_A", "lora_B": "mora_lora_B", "lora_magnitude_vector": "mora_magnitude"}
    theirs = {}
    for name, param in peft.named_parameters():
        if param.requires_grad:
            for old, new in rename.items():
                name = name.replace(f".{old}.", f".{new}.")
            theirs[name] = param
    mine = {name: p for name, p in ours.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() and any("magnitude" in n for n in mine) == (method == "dora")
    for name, param in mine.items():
        assert torch.equal(param, theirs[name]), name  # PEFT's init, drawn in the same order
    randomize_adapter(peft, seed=3)
    with torch.no_grad():
        for name, param in mine.items():
            param.copy_(theirs[name])
    ids = input_ids()
    expected = logits(peft, ids)
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-6, rtol=0)
    assert (expected - logits(make(), ids)).abs().max() > 1e-2  # the adapters really act
    merged, peft_merged = ours.merge_and_unload(safe_merge=True), peft.merge_and_unload()
    for (name, weight), (_, theirs_weight) in zip(merged.state_dict().items(), peft_merged.state_dict().items()):
        torch.testing.assert_close(weight, theirs_weight, atol=1e-6, rtol=1e-6, msg=name)


# -- several adapters, mixed batches --------------------------------------------------------------------------------


def test_mixed_batch_and_named_adapters_of_different_methods(tmp_path):
    """Adapter "default" (MoRA/LoRA/DoRA per module), "lora" (LoRA everywhere) and "mora" (MoRA everywhere) share
    layers; each row of one batch gets its own; they save, load, switch and delete as PEFT's named adapters do."""
    model = get_peft_model(LLAMA(), mixed_config(init_weights=False))
    model.add_adapter("lora", mixed_config(layer_methods={".*": "lora"}, init_weights=False))
    model.add_adapter("mora", mixed_config(layer_methods={}, lora_alpha=None, compression="rotation"))
    randomize_adapter(model, seed=4)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert layer.mora_method == {"default": "dora", "lora": "lora", "mora": "mora"}
    model.eval()
    ids = input_ids(rows=4)
    names = ["lora", "default", "__base__", "mora"]
    expected = {}
    for name in set(names) - {"__base__"}:
        model.set_adapter(name)
        expected[name] = logits(model, ids)
    with model.disable_adapter():
        expected["__base__"] = logits(model, ids)
    assert len({round(e.sum().item(), 3) for e in expected.values()}) == 4  # they differ
    with torch.no_grad():
        batch = model(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(batch[row], expected[name][row], atol=1e-5, rtol=1e-5, msg=name)

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(LLAMA(), tmp_path).eval()
    for name in ("lora", "mora"):
        loaded.load_adapter(tmp_path / name, adapter_name=name)
    for name in ("default", "lora", "mora"):
        loaded.set_adapter(name)
        assert torch.equal(logits(loaded, ids), expected[name]), name
    loaded.delete_adapter("lora")
    down = loaded.base_model.model.model.layers[1].mlp.down_proj
    assert "lora" not in down.mora_lora_A and "lora" not in down.mora_method


# -- merge, export, ReMoRA ------------------------------------------------------------------------------------------


def test_moraft_merge_equals_merge_and_unload(tmp_path, llama_dir):
    peft = save_adapter(load_model(llama_dir), mixed_config(), tmp_path / "adapter", seed=6)
    merge_adapter(llama_dir, tmp_path / "adapter", tmp_path / "merged")
    ids = input_ids()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    expected = peft.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), logits(expected, ids), atol=1e-5, rtol=1e-5)
    for name, weight in expected.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], weight, atol=1e-6, rtol=1e-6, msg=name)


def test_export_lora_keeps_lora_modules_and_refuses_dora(tmp_path, llama_dir):
    peft = save_adapter(load_model(llama_dir), mixed_config(layer_methods={r"mlp\..*": "lora"}), tmp_path / "a", 7)
    result = export_lora(tmp_path / "a", tmp_path / "lora", base=llama_dir)
    assert set(result.errors.values()) == {0.0}
    ids = input_ids()
    exported = PeftModel.from_pretrained(load_model(llama_dir), tmp_path / "lora")
    torch.testing.assert_close(logits(exported, ids), logits(peft, ids), atol=1e-5, rtol=1e-5)

    save_adapter(load_model(llama_dir), mixed_config(), tmp_path / "d", 7)
    with pytest.raises(UserError, match="modules are DoRA .* merge the adapter into the base model instead"):
        export_lora(tmp_path / "d", tmp_path / "nothing", base=llama_dir)
    assert not (tmp_path / "nothing").exists()


def test_remora_restart_keeps_function_and_restarts_lora_and_dora_modules():
    model = randomize_adapter(get_peft_model(LLAMA(), mixed_config()), seed=8).eval()
    ids = input_ids()
    before = logits(model, ids)
    restarted = merge_and_restart(model)
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=1e-5)
    down = model.base_model.model.model.layers[1].mlp.down_proj
    assert not down.merged and not down.mora_lora_B["default"].weight.any()
    assert any(p is down.mora_magnitude["default"].weight for p in restarted)
    # the model is again "base (now merged) + a fresh adapter": the restarted adapter changes nothing
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=1e-5)


# -- moraft serve ---------------------------------------------------------------------------------------------------


def test_served_mixed_adapters_equal_peft(serve_base, tmp_path):
    """A real ``moraft serve`` on loopback: the greedy text of mixed MoRA/DoRA/LoRA adapters equals PeftModel's."""
    adapters = tmp_path / "adapters"
    for seed, (name, overrides) in enumerate({
        "mixed": {},
        "mixed-rot": dict(compression="rotation", layer_methods={r"layers\.0\..*": "dora"}, use_rslora=True),
    }.items()):
        save_adapter(load_model(serve_base), mixed_config(**overrides), adapters / name, seed=20 + seed, std=0.5)
    tokenizer = char_tokenizer()
    prompt = "The cat sat on"
    ids = tokenizer(prompt)["input_ids"]
    expected = {
        name: tokenizer.decode(reference(serve_base, adapters / name if name else None, ids, 16),
                               skip_special_tokens=True)
        for name in ("mixed", "mixed-rot", None)
    }
    assert len(set(expected.values())) == 3  # the adapters change the text
    with MoraftServe(serve_base, adapters) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        for name in ("mixed", "mixed-rot"):
            body = {"model": name, "prompt": prompt, "max_tokens": 16, "temperature": 0}
            answer = client.post("/v1/completions", json=body).json()
            assert answer["choices"][0]["text"] == expected[name], name


def test_served_rows_equal_each_adapters_peft_model(serve_base, tmp_path):
    from moraft.serve.adapters import AdapterStore
    from moraft.serve.layers import wrap_model

    adapters = tmp_path / "adapters"
    save_adapter(load_model(serve_base), mixed_config(), adapters / "a", seed=30, std=0.5)
    save_adapter(load_model(serve_base), mixed_config(layer_methods={".*": "dora"}), adapters / "b", seed=31, std=0.5)
    model = load_model(serve_base)
    rows, shapes = wrap_model(model)
    store = AdapterStore(adapters, shapes, torch.device("cpu"), 2**30, base_config=model.config)
    names = ["a", "b", None, "b", "a"]
    ids = input_ids(rows=len(names), length=7)
    rows.assign([store.acquire(n) if n else None for n in names])
    served = logits(model, ids)
    for name in set(names):
        index = torch.tensor([row for row, n in enumerate(names) if n == name])
        expected = logits(load_model(serve_base, adapters / name if name else None), ids[index])
        torch.testing.assert_close(served[index], expected, atol=2e-5, rtol=1e-5, msg=f"adapter {name}")


# -- moraft train ---------------------------------------------------------------------------------------------------


def test_train_with_layer_methods_then_eval_and_peft_load(tmp_path, capsys):
    from moraft.train import load_trained
    from moraft.train.methods import load_base

    out = tmp_path / "out"
    status, _, err = run_cli(["train", *tiny_flags(out), "--layer_methods", json.dumps({r"layers\.1\..*": "dora"})],
                             capsys)
    assert status == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "MORA" and config["layer_methods"] == {r"layers\.1\..*": "dora"}
    status, stdout, err = run_cli(["eval", str(out)], capsys)
    assert status == 0 and "char_accuracy" in json.loads(stdout.strip().splitlines()[-1]), err

    trained, _, _ = load_trained(str(out))
    down = trained.base_model.model.model.layers[1].mlp.down_proj
    assert down.mora_method["default"] == "dora"
    assert "default" in trained.base_model.model.model.layers[0].mlp.down_proj.mora_M
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = load_base("builtin:tiny-llama", hidden_size=32, num_layers=2)
    loaded = PeftModel.from_pretrained(base, out)
    ids = input_ids()
    assert torch.equal(logits(loaded, ids), logits(trained, ids))

    status, _, err = run_cli(["train", *tiny_flags(tmp_path / "lora"), "--adapter.method", "lora",
                              "--adapter.layer_methods", json.dumps({"q_proj": "dora"})], capsys)
    assert status == 2 and "adapter.layer_methods is a mora option" in err
    assert not (tmp_path / "lora").exists()


def test_scale_layer_acts_on_lora_modules_as_in_peft():
    """``scale_layer`` / ``unscale_layer`` (PEFT's LoRA layer API) scale the LoRA/DoRA modules and restore them."""
    from moraft.mora import MoraLayer

    model = randomize_adapter(get_peft_model(LLAMA(), mixed_config(layer_methods={".*": "lora"})), seed=9).eval()
    ids = input_ids()
    before = logits(model, ids)
    layers = [m for m in model.modules() if isinstance(m, MoraLayer)]
    for layer in layers:
        layer.scale_layer(0.0)
    torch.testing.assert_close(logits(model, ids), logits(LLAMA(), ids), atol=1e-6, rtol=0)
    for layer in layers:
        layer.unscale_layer()
    assert torch.equal(logits(model, ids), before)
