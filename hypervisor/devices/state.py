"""Device state as data (vm-superio's `state()` / `from_state()` is the model): a device gives
its registers and queues as a plain, JSON-ready mapping, with no threads, files, callbacks or KVM
handles in it, and a device of the same type can be set from it. Snapshots store these mappings.

A device lists the attributes that make up its state in `STATE_FIELDS` and bumps
`STATE_VERSION` when their meaning changes; values are ints, bools, None, bytes/bytearray
(stored as hex), deques and lists of those, or tuples. Callbacks and interrupt lines are wired
by the machine, not saved. `state()` and `restore_state()` run under the device's bus lock
(hypervisor.devices.gate), as its register accesses do, so a snapshot never sees a half-done
access (the console thread may still be typing into the UART while the vCPUs are paused).
"""

from __future__ import annotations

import collections
from typing import Any, ClassVar

from hypervisor.devices.gate import GatedDevice
from hypervisor.errors import ConfigError

JsonValue = Any


def _encode(value: object) -> JsonValue:
    if isinstance(value, (bytes, bytearray)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, collections.deque):
        return {"deque": [_encode(item) for item in value]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(item) for item in value]}
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"cannot save a {type(value).__name__} in a device state")


def _decode(value: JsonValue, like: object) -> object:
    if isinstance(value, dict):
        if "hex" in value:
            data = bytes.fromhex(value["hex"])
            return bytearray(data) if isinstance(like, bytearray) else data
        if "deque" in value:
            return collections.deque(_decode(item, None) for item in value["deque"])
        if "tuple" in value:
            return tuple(_decode(item, None) for item in value["tuple"])
        raise ValueError(f"unknown encoded value {sorted(value)}")
    if isinstance(value, list):
        return [_decode(item, None) for item in value]
    return value


class StatefulDevice(GatedDevice):
    """Mixin: `state()` and `restore_state(state)` over the class's STATE_FIELDS."""

    STATE_FIELDS: ClassVar[tuple[str, ...]] = ()
    STATE_VERSION: ClassVar[int] = 1

    def state(self) -> dict[str, JsonValue]:
        fields = self._serialised(self._encoded_fields)
        return {"type": type(self).__name__, "version": self.STATE_VERSION, "fields": fields}

    def _encoded_fields(self) -> dict[str, JsonValue]:
        return {name: _encode(getattr(self, name)) for name in self.STATE_FIELDS}

    def _set_fields(self, decoded: dict[str, object]) -> None:
        for key, value in decoded.items():
            setattr(self, key, value)

    def restore_state(self, state: dict[str, JsonValue]) -> None:
        """Sets the device from `state`; ConfigError (one line) if it is not this device's."""
        name = type(self).__name__
        if not isinstance(state, dict) or state.get("type") != name:
            raise ConfigError(f"saved device state is not a {name}'s")
        if state.get("version") != self.STATE_VERSION:
            raise ConfigError(f"saved {name} state has version {state.get('version')}, pyhv reads {self.STATE_VERSION}")
        fields = state.get("fields")
        if not isinstance(fields, dict) or set(fields) != set(self.STATE_FIELDS):
            raise ConfigError(f"saved {name} state does not have the fields of this version")
        try:
            decoded = {key: _decode(value, getattr(self, key)) for key, value in fields.items()}
        except (ValueError, TypeError) as error:
            raise ConfigError(f"saved {name} state is damaged: {error}") from error
        try:
            self._serialised(self._set_fields, decoded)
        except (ValueError, TypeError) as error:  # a field whose setter checks its value
            raise ConfigError(f"saved {name} state is damaged: {error}") from error
