"""`moraft.adapters`: the one decision, from PEFT's own field metadata, of which adapters each use applies exactly."""

from __future__ import annotations

import pytest
from helpers import FIXTURE
from peft import KasaConfig, LoraConfig

from moraft import MoraConfig
from moraft.adapters import check_adapter, lora_variants, read_adapter_config, unsupported_options
from moraft.errors import UserError
from moraft.train import load_trained

VARIANTS = {  # LoRA variants PEFT 0.21 tags is_lora_variant (or lists in init_lora_weights' lora_variants)
    "dora": (dict(use_dora=True), {"use_dora": True}),
    "kasa": (dict(kasa_config=KasaConfig()), {"kasa_config"}),
    "alora": (dict(alora_invocation_tokens=[5, 6]), {"alora_invocation_tokens": [5, 6]}),
    "mica": (dict(init_lora_weights="mica"), {"init_lora_weights": "mica"}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_come_from_peft_metadata(name):
    options, expected = VARIANTS[name]
    found = lora_variants(LoraConfig(r=4, task_type="CAUSAL_LM", **options))
    assert (set(found) if isinstance(expected, set) else found) == expected
    # serve and export apply scaling·B·A themselves: every variant is refused, naming its option
    for use in ("serve", "export"):
        with pytest.raises(UserError, match=rf"{next(iter(found))}=.*a LoRA variant"):
            check_adapter(LoraConfig(r=4, task_type="CAUSAL_LM", **options), use, "here")
    # merge goes through PEFT's own layer code, eval through PEFT itself
    assert unsupported_options(LoraConfig(r=4, task_type="CAUSAL_LM", **options), "merge") == {}
    assert unsupported_options(LoraConfig(r=4, task_type="CAUSAL_LM", **options), "eval") == {}


def test_plain_lora_and_mora_are_every_use():
    for config in (LoraConfig(r=4, init_lora_weights="gaussian"), LoraConfig(r=4, use_rslora=True), MoraConfig()):
        assert lora_variants(config) == {}
        for use in ("merge", "serve", "export", "eval"):
            check_adapter(config, use, "here")


def test_options_beyond_the_weight_matrices():
    config = LoraConfig(r=4, lora_bias=True, bias="all")
    assert set(unsupported_options(config, "merge")) == {"lora_bias=True"}
    assert set(unsupported_options(config, "serve")) == {"lora_bias=True", "bias='all'"}
    assert unsupported_options(config, "eval") == {}
    with pytest.raises(ValueError, match="use='deploy' is not one of merge, serve, export, eval"):
        unsupported_options(config, "deploy")


def test_read_adapter_config_names_the_problem(tmp_path):
    with pytest.raises(UserError, match=r"nowhere is not a directory"):
        read_adapter_config(tmp_path / "nowhere", "eval")
    with pytest.raises(UserError, match=r"adapter_config\.json not found"):
        read_adapter_config(tmp_path, "eval")
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"holds a list, expected a JSON object"):
        read_adapter_config(tmp_path, "eval")
    MoraConfig(r=4).save_pretrained(tmp_path)
    assert isinstance(read_adapter_config(tmp_path, "merge", accepted=("MORA",)), MoraConfig)
    with pytest.raises(UserError, match=r"peft_type='MORA' is not supported here; accepted: LORA"):
        read_adapter_config(tmp_path, "merge", accepted=("LORA",))


def test_eval_refuses_a_peft_mora_checkpoint_with_the_convert_command():
    # peft-mora saves peft_type LORA with use_mora: loaded by PEFT as a LoRA, it would be wrong
    with pytest.raises(UserError, match=r"written by the authors' peft-mora .*moraft convert-peft-mora"):
        load_trained(str(FIXTURE / "adapter_type6"), base="builtin:tiny-llama")
