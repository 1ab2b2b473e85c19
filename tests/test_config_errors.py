"""Bad configuration gets an error naming the value and what is accepted; the PEFT hook fails loudly if PEFT moves."""

from __future__ import annotations

import importlib
import warnings

import pytest
from peft import get_peft_model
from torch import nn

from moraft import MoraConfig, MoraLayer, MoraModel, _peft_hook
from moraft.testing import tiny_llama


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(r=0), r"r=0 is invalid; expected an integer >= 1"),
        (dict(r=-3), r"r=-3 is invalid"),
        (dict(r=2.5), r"r=2.5 is invalid"),
        (dict(mora_rank=0), r"mora_rank=0 is invalid"),
        (dict(mora_rank=7, compression="rotation"), r"mora_rank=7 is odd"),
        (dict(compression="type6"), r"compression='type6' is not one of sharing, rotation, decouple, truncation"),
        (dict(compression=6), r"compression=6 is not one of"),
        (dict(input_grouping="random"), r"input_grouping='random' is not one of strided, contiguous"),
        (dict(compression="rotation", output_grouping="contiguous"), r"only applies to compression='sharing'"),
        (dict(dropout=1.0), r"dropout=1.0 is invalid; expected a number in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout=-0.1 is invalid"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]=0 is invalid"),
        (dict(rank_pattern=[1]), r"rank_pattern=\[1\] is invalid; expected a dict"),
        (dict(target_modules="q_proj("), r"target_modules='q_proj\(' is not a valid regex"),
        (dict(target_modules=5), r"target_modules=5 is invalid"),
        (dict(layers_to_transform=[-1]), r"layers_to_transform=\[-1\] is invalid"),
        (dict(modules_to_save="lm_head"), r"modules_to_save='lm_head' is invalid; expected a list"),
        (dict(init_weights="gaussian"), r"init_weights='gaussian' is invalid"),
    ],
)
def test_invalid_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoraConfig(**kwargs)


def test_target_modules_matching_nothing_lists_what_exists():
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_llama(), MoraConfig(target_modules=["qproj", "attn"]))
    message = str(info.value)
    assert "matched no module" in message and "['attn', 'qproj']" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message


def test_unsupported_layer_type_is_named():
    with pytest.raises(ValueError, match=r"'model.embed_tokens'.*torch.nn.modules.sparse.Embedding.*Linear and transformers Conv1D"):
        get_peft_model(tiny_llama(), MoraConfig(target_modules=["embed_tokens"]))


def test_default_targets_follow_the_architecture():
    model = get_peft_model(tiny_llama(), MoraConfig())
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}


def test_hook_fails_with_a_clear_message_if_peft_moves_its_tables(monkeypatch):
    mapping = importlib.import_module("peft.mapping")
    monkeypatch.delattr(mapping, "PEFT_TYPE_TO_TUNER_MAPPING")
    with pytest.raises(ImportError, match=r"peft.mapping no longer has .*tested with peft>=0.21,<0.22"):
        _peft_hook.register(MoraConfig, MoraModel, "mora_")


def test_peft_resolves_mora_from_a_saved_config(tmp_path):
    from peft import PeftConfig

    MoraConfig(r=4, compression="decouple", target_modules=["q_proj"]).save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MoraConfig) and loaded.compression == "decouple" and loaded.r == 4


def test_custom_module_with_unsupported_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)
            self.lin = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"'conv'.*Conv2d"):
        get_peft_model(Net(), MoraConfig(target_modules=["conv"]))


def test_all_linear_is_not_a_regex_for_layers_to_transform():
    model = get_peft_model(tiny_llama(), MoraConfig(target_modules="all-linear", layers_to_transform=[1]))
    adapted = {n for n, m in model.named_modules() if isinstance(m, MoraLayer)}
    assert adapted and all(".layers.1." in n for n in adapted) and len(adapted) == 7
    with pytest.raises(ValueError, match=r"regex target_modules \('.*q_proj'\); name the modules in a list"):
        MoraConfig(target_modules=r".*q_proj", layers_to_transform=[1])


def test_import_leaves_the_warning_filters_alone():
    """``import moraft`` adds no global filter; moraft's own PEFT calls silence PEFT's transformers deprecation only
    while they run."""
    import subprocess
    import sys

    code = ("import warnings, torch, transformers, peft, accelerate; before = list(warnings.filters); import moraft, "
            "moraft.train, moraft.interop; print([f for f in warnings.filters if f not in before])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr[-2000:]

    from moraft.train import AdapterOptions, apply_method

    for quiet, call in ((True, lambda m: apply_method(m, AdapterOptions(r=2))),
                        (False, lambda m: get_peft_model(m, MoraConfig(r=2)))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(tiny_llama())
        said = [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
        assert (said == []) is quiet, [str(w.message) for w in said]
