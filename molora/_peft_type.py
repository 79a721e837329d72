"""Adding the ``MOLORA`` member to PEFT's closed ``PeftType`` enum.

``peft.utils.register_peft_method`` only accepts names that already exist in ``PeftType`` and the enum has no
extension hook, so an out-of-tree method has to add its member itself. We add it exactly the way ``enum`` builds
members of a ``str`` mix-in enum (a ``str`` instance carrying ``_name_``/``_value_``), so that ``PeftType("MOLORA")``,
``PeftType.MOLORA``, ``PeftType["MOLORA"]``, ``list(PeftType)`` and JSON round-trips of ``adapter_config.json`` all
behave as for a built-in member.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

MOLORA_NAME = "MOLORA"


def ensure_peft_type() -> PeftType:
    """Return ``PeftType.MOLORA``, creating it on first use. Safe to call any number of times."""
    existing = PeftType.__members__.get(MOLORA_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, MOLORA_NAME)
    member._name_ = MOLORA_NAME
    member._value_ = MOLORA_NAME
    member.__objclass__ = PeftType
    # The order matters: EnumType.__setattr__ refuses to set a name that is already in _member_map_.
    type.__setattr__(PeftType, MOLORA_NAME, member)
    PeftType._member_map_[MOLORA_NAME] = member
    PeftType._value2member_map_[MOLORA_NAME] = member
    PeftType._member_names_.append(MOLORA_NAME)
    return member
