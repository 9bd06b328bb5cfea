"""A backbone's identity by content: the SHA-256 of every file of its directory.

Why: deployed nodes load their encoders from their own disks (any path); what must agree is the weights, not where
they lie. Hashing a real T5 (GBs) on every start would cost seconds to minutes, so the digest of each file is kept
in a small JSON next to the node's feature cache, keyed by (path, size, mtime): a file rewritten in place is hashed
again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

CHUNK = 1 << 22


def _file_digest(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(CHUNK):
      h.update(block)
  return h.hexdigest()


def fingerprint(directory: str | Path, cache_file: Optional[str | Path] = None) -> str:
  """sha256 over (relative name, size, sha256 of content) of every file under ``directory``, sorted by name."""
  root = Path(directory)
  known: dict = {}
  cache = Path(cache_file) if cache_file is not None else None
  if cache is not None and cache.is_file():
    try:
      known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
      known = {}
  h, changed = hashlib.sha256(), False
  for path in sorted(p for p in root.rglob("*") if p.is_file()):
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in known:
      known[key], changed = _file_digest(path), True
    h.update(f"{path.relative_to(root).as_posix()}|{st.st_size}|{known[key]}\n".encode())
  if cache is not None and changed:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(known))
    tmp.replace(cache)
  return h.hexdigest()[:16]
