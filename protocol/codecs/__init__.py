"""Update codecs: how a delta travels. A codec is named in the aggregator's task config, the schedule and the
update manifest; the aggregator folds what a codec decodes one tensor at a time (`Codec.parts`).

Adding a codec is one module with a `Codec` subclass and one line in `CODECS`:

- `dense`: every tensor as it is (protocol.tensors);
- `fp16`: floating tensors as float16;
- `topk`: the largest `fraction` of each floating tensor, as indices and float16 values (with error feedback
  on the sender, agent.compression);
- `dct`: the lowest `fraction` of each floating tensor's DCT coefficients (FedFT);
- `sparse`: the nonzero elements of each floating tensor, exactly (a round's average of top-k updates).

Any of them can be wrapped in lossless zstd: `<name>+zstd`.
"""

from __future__ import annotations

import msgspec

from protocol.codecs.base import Codec, Dense, Part, PartialCodec, Sparse
from protocol.codecs.dct import DctCodec
from protocol.codecs.dense import DenseCodec
from protocol.codecs.fp16 import Fp16Codec
from protocol.codecs.sparse import SparseCodec
from protocol.codecs.topk import TopKCodec
from protocol.codecs.zstd import Zstd
from protocol.errors import ProtocolError
from protocol.schemas import CodecSpec

CODECS: dict[str, type[Codec]] = {
    DenseCodec.name: DenseCodec,
    Fp16Codec.name: Fp16Codec,
    TopKCodec.name: TopKCodec,
    DctCodec.name: DctCodec,
    SparseCodec.name: SparseCodec,
}
ZSTD_SUFFIX = "+zstd"


def make_codec(name: str, fraction: float | None = None) -> Codec:
    """The codec called `name` (`<codec>` or `<codec>+zstd`); `fraction` for the codecs that keep a part."""
    kind = codec_kind(name)
    codec = kind(fraction) if issubclass(kind, PartialCodec) else kind()
    return Zstd(codec) if name.endswith(ZSTD_SUFFIX) else codec


def warmed(spec: CodecSpec, base_version: int) -> CodecSpec:
    """The spec of a round that trains from the task's global version `base_version` (0: its initial model): in
    the warm-up, a partial codec keeps 2^(warmup_rounds - base_version) times its share (at most everything)."""
    kind = codec_kind(spec.name)
    if base_version >= spec.warmup_rounds or not issubclass(kind, PartialCodec):
        return spec
    fraction = (spec.fraction or kind.default_fraction) * 2 ** (spec.warmup_rounds - base_version)
    return msgspec.structs.replace(spec, fraction=min(1.0, fraction))


def codec_kind(name: str) -> type[Codec]:
    """The class of the codec called `name` (with or without `+zstd`); ProtocolError (a ValueError) if there is
    none: a name from a message is bad input, one from a config a config error."""
    kind = CODECS.get(name.removesuffix(ZSTD_SUFFIX))
    if kind is None:
        raise ProtocolError(f"unknown codec {name!r}; known: {sorted(CODECS)} (each also with {ZSTD_SUFFIX})")
    return kind


__all__ = ["CODECS", "Codec", "Dense", "Part", "PartialCodec", "Sparse", "codec_kind", "make_codec", "warmed"]
