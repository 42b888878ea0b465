"""fastmatch: skill-based matchmaking over WebSocket with Redis as the only shared state."""

__version__ = "0.1.0"
