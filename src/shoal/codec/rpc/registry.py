"""The RPC protocols Shoal speaks, by name, and detection from a connection's first bytes.

Adding a protocol: write its codec module (see docs/protocols.md) and add one entry here.
"""

from __future__ import annotations

from shoal.codec.rpc.base import RpcCodec
from shoal.codec.rpc.bolt import BoltCodec
from shoal.codec.rpc.dubbo import DubboCodec
from shoal.codec.rpc.motan2 import Motan2Codec

CODECS: dict[str, RpcCodec] = {
    codec.name: codec for codec in (DubboCodec(), BoltCodec(), Motan2Codec())
}
