"""moraft: MoRA as a first-class Hugging Face PEFT method.

``import moraft`` registers the method with PEFT, after which ``get_peft_model(model, MoraConfig(...))`` and
``PeftModel.from_pretrained(model, mora_adapter_dir)`` work as for any PEFT method.
"""

from . import threads

threads.set_command_defaults()  # the `moraft` command's OpenMP spin count, before anything imports torch

from . import _peft_hook  # noqa: E402

_peft_hook.import_peft()  # before any module of moraft imports PEFT: without bitsandbytes (see import_peft)

from .mora import COMPRESSIONS, MoraConfig, MoraLayer, MoraLinear, MoraModel, MoraOperator, mora_rank  # noqa: E402

_peft_hook.register(MoraConfig, MoraModel, MoraModel.prefix)

from .errors import UserError  # noqa: E402
from .interop import convert_peft_mora, export_lora, merge_adapter  # noqa: E402  (needs MoRA registered)

__version__ = "0.1.0"
__all__ = [
    "COMPRESSIONS",
    "MoraConfig",
    "MoraLayer",
    "MoraLinear",
    "MoraModel",
    "MoraOperator",
    "UserError",
    "convert_peft_mora",
    "export_lora",
    "merge_adapter",
    "mora_rank",
]
