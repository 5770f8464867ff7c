"""The prefix domain, at the bottom of the project: what a prefix is, how it is checked,
how PEFT stores it, and how prefixes are named. The engine, the store, training and the
api import it; it imports none of them (enforced by import-linter, see pyproject.toml).

    model_spec.py   ModelKind, ModelSpec (what a prefix must match), model_fingerprint
    prefix.py       PrefixRef, Prefix (checked once, when made), validate_kv, compose
    head.py         ClassifierHead, the head a SEQ_CLS prefix brings
    peft_format.py  PEFT adapter folders and safetensors files, read and written (also SEQ_CLS)
    ids.py          the naming rules of tenants, prefixes, versions and users
"""

from server.prefix.ids import (
    SHARED_PREFIX,
    USER_PREFIX,
    InvalidIdError,
    shorten,
    user_prefix_id,
    validate_prefix_id,
    validate_tenant,
    validate_version,
)
from server.prefix.head import ClassifierHead
from server.prefix.model_spec import ModelKind, ModelSpec, model_fingerprint
from server.prefix.peft_format import ModelMismatchError
from server.prefix.prefix import FLOAT_DTYPES, Prefix, PrefixError, PrefixRef, compose, validate_kv

__all__ = [
    "ClassifierHead", "FLOAT_DTYPES", "InvalidIdError", "ModelKind", "ModelMismatchError", "ModelSpec", "Prefix", "PrefixError", "PrefixRef",
    "SHARED_PREFIX", "USER_PREFIX", "compose", "model_fingerprint", "shorten", "user_prefix_id",
    "validate_kv", "validate_prefix_id", "validate_tenant", "validate_version",
]
