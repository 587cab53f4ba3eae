"""Wire codecs for pseudo-gradient parts: none (fp32), fp16, int8 (bitsandbytes blockwise) and int4.

Pure torch, deterministic and elementwise on decode, so every peer that decodes the same bytes
gets the same bits. A codec turns a flat float32 tensor into a `runtime_pb2.Tensor` whose
`dtype` field names the codec; `decode` checks the sizes before it trusts anything (the bytes
come from other peers) and raises ValueError on a malformed message.

Bytes per value: none 4, fp16 2, int8 1 + 4/4096 (one fp32 absmax per 4096 values),
int4 0.5 + 4/128 (one fp32 absmax per 128 values).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hivemind.proto import runtime_pb2

INT8_BLOCK = 4096
INT4_BLOCK = 128
FP16_MAX = 65504.0


class Codec:
    name = "none"
    bytes_per_value = 4.0
    lossy = False

    def encode(self, x: torch.Tensor) -> runtime_pb2.Tensor:
        x = x.detach().reshape(-1).float().contiguous()
        return runtime_pb2.Tensor(buffer=x.numpy().tobytes(), size=[x.numel()], dtype=self.name)

    def decode(self, msg: runtime_pb2.Tensor) -> torch.Tensor:
        n = self._numel(msg, 4 * _n(msg))
        return torch.from_numpy(np.frombuffer(msg.buffer, dtype=np.float32, count=n).copy())

    def roundtrip(self, x: torch.Tensor) -> tuple[runtime_pb2.Tensor, torch.Tensor]:
        msg = self.encode(x)
        return msg, self.decode(msg)

    def _numel(self, msg: runtime_pb2.Tensor, expected_bytes: int) -> int:
        if msg.dtype != self.name:
            raise ValueError(f"part encoded as {msg.dtype!r}, expected {self.name!r}")
        if len(msg.size) != 1 or len(msg.buffer) != expected_bytes:
            raise ValueError(f"malformed {self.name} part: {len(msg.buffer)} bytes for size {list(msg.size)}")
        return int(msg.size[0])


def _n(msg: runtime_pb2.Tensor) -> int:
    if len(msg.size) != 1 or not 0 <= msg.size[0] < 2**34:
        raise ValueError(f"malformed part size {list(msg.size)}")
    return int(msg.size[0])


class Fp16(Codec):
    name, bytes_per_value, lossy = "fp16", 2.0, True

    def encode(self, x):
        x = x.detach().reshape(-1).float().clamp(-FP16_MAX, FP16_MAX).half().contiguous()
        return runtime_pb2.Tensor(buffer=x.numpy().tobytes(), size=[x.numel()], dtype=self.name)

    def decode(self, msg):
        n = self._numel(msg, 2 * _n(msg))
        return torch.from_numpy(np.frombuffer(msg.buffer, dtype=np.float16, count=n).astype(np.float32))


class Int8Blockwise(Codec):
    """bitsandbytes blockwise 8-bit quantization (dynamic signed map, fp32 absmax per 4096 values)."""

    name, bytes_per_value, lossy = "int8", 1.0 + 4.0 / INT8_BLOCK, True

    def __init__(self):
        import bitsandbytes.functional as bnbf

        self._f = bnbf
        self._code = bnbf.create_dynamic_map(signed=True).float()
        self._code_np = self._code.numpy()

    def encode(self, x):
        x = x.detach().reshape(-1).float().contiguous()
        n = x.numel()
        if n == 0:
            return runtime_pb2.Tensor(buffer=b"", size=[0], dtype=self.name)
        q, st = self._f.quantize_blockwise(x, code=self._code, blocksize=INT8_BLOCK)
        absmax = st.absmax.float().contiguous()
        return runtime_pb2.Tensor(buffer=absmax.numpy().tobytes() + q.numpy().tobytes(), size=[n], dtype=self.name)

    def decode(self, msg):
        n = _n(msg)
        blocks = math.ceil(n / INT8_BLOCK)
        self._numel(msg, 4 * blocks + n)
        if n == 0:
            return torch.zeros(0)
        absmax = np.frombuffer(msg.buffer, dtype=np.float32, count=blocks)
        if not np.isfinite(absmax).all():
            raise ValueError("int8 part with a non-finite scale")
        q = np.frombuffer(msg.buffer, dtype=np.uint8, offset=4 * blocks, count=n)
        # the same arithmetic as bitsandbytes' dequantize_blockwise (code[q] x the block's absmax), written
        # out so it is plainly elementwise; in place, block by block, with no int64 index or repeated scale
        out = self._code_np[q]
        full = n // INT8_BLOCK
        out[: full * INT8_BLOCK].reshape(full, INT8_BLOCK)[...] *= absmax[:full, None]
        if n > full * INT8_BLOCK:
            out[full * INT8_BLOCK:] *= absmax[full]
        return torch.from_numpy(out)


class Int4Blockwise(Codec):
    """Symmetric 4-bit absmax quantization: 15 levels (-7..7) per block of 128 values, two per byte."""

    name, bytes_per_value, lossy = "int4", 0.5 + 4.0 / INT4_BLOCK, True

    def encode(self, x):
        x = x.detach().reshape(-1).float()
        n = x.numel()
        blocks = math.ceil(n / INT4_BLOCK)
        padded = torch.zeros(blocks * INT4_BLOCK)
        padded[:n] = x
        padded = padded.view(blocks, INT4_BLOCK)
        absmax = padded.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax / 7.0, torch.ones_like(absmax))
        q = torch.round(padded / scale[:, None]).clamp_(-7, 7).to(torch.int16).add_(8).to(torch.uint8).view(-1)[:n]
        if q.numel() % 2:
            q = torch.cat([q, torch.zeros(1, dtype=torch.uint8)])
        packed = (q[0::2] | (q[1::2] << 4)).contiguous()
        return runtime_pb2.Tensor(buffer=absmax.contiguous().numpy().tobytes() + packed.numpy().tobytes(),
                                  size=[n], dtype=self.name)

    def decode(self, msg):
        n = _n(msg)
        blocks = math.ceil(n / INT4_BLOCK)
        packed_len = (n + 1) // 2
        self._numel(msg, 4 * blocks + packed_len)
        absmax = torch.from_numpy(np.frombuffer(msg.buffer, dtype=np.float32, count=blocks).copy())
        if not torch.isfinite(absmax).all():
            raise ValueError("int4 part with a non-finite scale")
        packed = torch.from_numpy(np.frombuffer(msg.buffer, dtype=np.uint8, offset=4 * blocks, count=packed_len).copy())
        q = torch.full((blocks * INT4_BLOCK,), 8, dtype=torch.uint8)
        q[:n] = torch.stack([packed & 0x0F, packed >> 4], dim=1).view(-1)[:n]
        scale = torch.where(absmax > 0, absmax / 7.0, torch.ones_like(absmax))
        values = (q.to(torch.float32) - 8.0).view(blocks, INT4_BLOCK) * scale[:, None]
        return values.view(-1)[:n].clone()


CODECS = {c.name: c for c in (Codec, Fp16, Int8Blockwise, Int4Blockwise)}  # one name per codec: config, wire and logs


def make_codec(name: str) -> Codec:
    try:
        return CODECS[name]()
    except KeyError:
        raise ValueError(f"unknown compression {name!r}; choose one of {', '.join(CODECS)}") from None
