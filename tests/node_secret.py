"""The node secret of this test run: generated, never written in code (nodes require >= 32 bytes)."""

from __future__ import annotations

import secrets

NODE_SECRET = secrets.token_hex(32)
