"""Which device sends each update transfer, and whether the spool may take another one (quotas).

A transfer is admitted when its first message (a chunk or the manifest) arrives: it must fit the largest update
size, the sender's quota (bytes and number of transfers held at once) and the spool's total quota, all counted
on the sizes the held transfers declared. A refused transfer stays refused (its later chunks are dropped) and
its manifest is answered with a rejected receipt naming the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from aggregator.config import TransferConfig
from protocol import ProtocolError


class Refused(Exception):
    """A transfer the aggregator will not take; the message is the reason sent with the receipt. `new`: refused
    by this message (not an earlier one). `transient`: the update may be taken later as another transfer (a
    quota of transfers in progress), unlike one too large ever to be taken."""

    def __init__(self, reason: str, new: bool, transient: bool = True) -> None:
        super().__init__(reason)
        self.new, self.transient = new, transient


class UpdateAdmission:
    def __init__(self, limits: TransferConfig, remember_refused: int = 4096) -> None:
        self.limits = limits
        self.owners: dict[str, tuple[str, int]] = {}  # transfer id -> (device whose topic it came on, size)
        self._refused: dict[str, Refused] = {}  # transfer id -> why; insertion-ordered, bounded
        self._remember = remember_refused

    def claim(self, transfer_id: str, device: str, size: int, held: Callable[[], Mapping[str, int]]) -> None:
        """Admit a message of `device` for a transfer of `size` bytes; `held()` gives every transfer the spool
        holds and its size (asked only for a new transfer).

        Raises Refused for a refused transfer (now or earlier), ProtocolError for another device's transfer or
        for a size other than the one the transfer was admitted with.
        """
        refused = self._refused.get(transfer_id)
        if refused is not None:
            raise Refused(str(refused), new=False, transient=refused.transient)
        owner = self.owners.get(transfer_id)
        if owner is None:
            refused = self._over_quota(device, size, held())
            if refused is not None:
                self.refuse(transfer_id, str(refused), refused.transient)
                raise refused
            self.owners[transfer_id] = (device, size)
        elif owner[0] != device:
            raise ProtocolError(f"transfer {transfer_id} belongs to {owner[0]}; {device} cannot add to it")
        elif owner[1] != size:
            raise ProtocolError(f"transfer {transfer_id} was admitted with {owner[1]} bytes, not {size}")

    def refuse(self, transfer_id: str, reason: str, transient: bool = True) -> None:
        """Refuse a transfer from now on (its owner is forgotten)."""
        self.owners.pop(transfer_id, None)
        self._refused[transfer_id] = Refused(reason, new=False, transient=transient)
        if len(self._refused) > self._remember:
            self._refused.pop(next(iter(self._refused)))

    def release(self, transfer_id: str) -> None:
        """Forget a transfer that left the spool."""
        self.owners.pop(transfer_id, None)

    def restore(self, owners: Mapping[str, tuple[str, int]]) -> None:
        """Take up the transfers a restarted spool still holds: transfer id -> (device, size)."""
        self.owners.update(owners)

    def forget_gone(self, held: Mapping[str, int]) -> None:
        """Forget the owners of transfers the spool no longer holds (rejected, expired or delivered)."""
        for transfer_id in [t for t in self.owners if t not in held]:
            del self.owners[transfer_id]

    def _over_quota(self, device: str, size: int, held: Mapping[str, int]) -> Refused | None:
        limits = self.limits
        if size > limits.max_update_bytes:
            reason = f"update of {size} bytes exceeds max_update_bytes {limits.max_update_bytes}"
            return Refused(reason, new=True, transient=False)
        mine = [held[t] for t, (owner, _) in self.owners.items() if owner == device and t in held]
        if len(mine) >= limits.max_device_transfers:
            reason = f"quota: {device} already has {len(mine)} transfers in progress (max_device_transfers)"
        elif sum(mine) + size > limits.max_device_spool_bytes:
            reason = (
                f"quota: {device}'s transfers would hold {sum(mine) + size} bytes "
                f"(max_device_spool_bytes {limits.max_device_spool_bytes})"
            )
        elif (total := sum(held.values()) + size) > limits.max_spool_bytes:
            reason = (
                f"quota: the update spool would hold {total} bytes (max_spool_bytes {limits.max_spool_bytes})"
            )
        else:
            return None
        return Refused(reason, new=True)
