"""Wire protocol v1 (PROTOCOL.md): message schema, codec and per-connection state machine.

No asyncio and no Redis here: bytes and messages in, messages and effects out.
"""
