"""`heed backup DEST` and `heed restore SRC`: the database through SQLite's backup API plus the
adapter files it names, consistent while the app and the learner keep writing.

Order matters for consistency. The database is snapshotted first (one backup-API
step: a read transaction, so it is one committed state). Only then are the adapter
folders that snapshot names copied; a version folder is immutable once renamed
into place, so the copy matches the snapshot even if the learner promotes a newer
one meanwhile (the snapshot does not mention it). A ``manifest.json`` records every
copied file's SHA-256, and restore checks them.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
from pathlib import Path

from .store import Store, StoreError

MANIFEST = "manifest.json"
SERVED = ("active", "retired")  # versions a user can be served or rolled back to; rejected ones are not kept


class BackupError(StoreError):
    """A backup or restore was refused or failed; the message says why."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _adapter_rows(db_path: Path) -> list[dict]:
    conn = sqlite3.connect(str(db_path))
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT user_id, version, path, status FROM adapters ORDER BY user_id, version")]
    finally:
        conn.close()


def _rewrite_paths(db_path: Path, paths: dict[tuple[int, int], str]) -> None:
    conn = sqlite3.connect(str(db_path), isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for (user_id, version), path in paths.items():
            conn.execute("UPDATE adapters SET path = ? WHERE user_id = ? AND version = ?", [path, user_id, version])
        conn.execute("COMMIT")
    finally:
        conn.close()


def _copy_adapters(rows: list[dict], dest_adapters: Path) -> tuple[dict, list[dict]]:
    """Copy the served versions' folders; returns (new path per (user, version), file records)."""
    new_paths, files = {}, []
    for row in rows:
        src = Path(row["path"])
        target = dest_adapters / str(row["user_id"]) / src.name
        new_paths[(row["user_id"], row["version"])] = str(target.resolve())
        if row["status"] not in SERVED:
            continue
        if not src.is_dir():
            if row["status"] == "active":
                raise FileNotFoundError(src)
            continue  # a retired version already pruned from disk: the store knows it has no files
        shutil.copytree(src, target)
        for f in sorted(target.rglob("*")):
            if f.is_file():
                files.append({"path": str(f.relative_to(dest_adapters.parent)), "sha256": _sha256(f), "bytes": f.stat().st_size})
    return new_paths, files


def backup(heed, dest: str | Path, *, attempts: int = 3) -> dict:
    """Copy a consistent snapshot into ``dest`` (a new or empty folder); returns what was copied.

    ``dest`` then works as a ``data_dir``: its ``heed.db`` names adapter folders inside it.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} is not an empty folder; choose a new one")
    for attempt in range(1, attempts + 1):
        dest.mkdir(parents=True, exist_ok=True)
        db_copy = dest / heed.config.db_path.name
        t0 = time.perf_counter()
        heed.store.backup_to(db_copy)
        try:
            new_paths, files = _copy_adapters(_adapter_rows(db_copy), dest / "adapters")
            break
        except FileNotFoundError as exc:
            # The learner pruned a folder between the snapshot and the copy: take a new snapshot.
            shutil.rmtree(dest)
            if attempt == attempts:
                raise BackupError(f"adapter files vanished while copying ({exc}); try again") from exc
    _rewrite_paths(db_copy, new_paths)
    conn = sqlite3.connect(str(db_copy), isolation_level=None)
    try:
        # A backup is a file to keep and move: no -wal/-shm companions.
        conn.execute("PRAGMA journal_mode = DELETE")
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        rows = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
        schema = conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()
    if integrity != "ok":
        raise BackupError(f"the copied database fails its integrity check: {integrity}")
    manifest = {"created_at": time.time(), "schema_version": schema, "database": db_copy.name, "rows": rows,
                "database_sha256": _sha256(db_copy), "adapter_files": files, "seconds": round(time.perf_counter() - t0, 3)}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return {"dest": str(dest), "database": str(db_copy), "integrity": integrity, "rows": rows,
            "adapter_files": len(files), "bytes": sum(f["bytes"] for f in files) + db_copy.stat().st_size}


def restore(src: str | Path, config, *, force: bool = False) -> dict:
    """Put a backup made by ``backup`` in place as ``config``'s database and adapters.

    Refuses to overwrite a database that already has users unless ``force``.
    Every file is checked against the manifest before anything is replaced.
    """
    src = Path(src)
    manifest_path = src / MANIFEST
    if not manifest_path.is_file():
        raise BackupError(f"{src} is not a Heed backup (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BackupError(f"{manifest_path} is damaged: {exc}") from exc
    db_src = src / manifest["database"]
    if _sha256(db_src) != manifest["database_sha256"]:
        raise BackupError(f"{db_src} does not match the manifest (damaged or changed since the backup)")
    for f in manifest["adapter_files"]:
        path = src / f["path"]
        if not path.is_file() or _sha256(path) != f["sha256"]:
            raise BackupError(f"{path} is missing or does not match the manifest")
    db_dest = config.db_path
    if db_dest.exists() and not force:
        existing = Store(db_dest).list_users()
        if existing:
            raise BackupError(f"{db_dest} already holds {len(existing)} users; restore into an empty data_dir or pass --force")
    adapters_dest = config.adapters_path
    staging = adapters_dest.parent / f".restore-{int(time.time())}"
    if staging.exists():
        shutil.rmtree(staging)
    if (src / "adapters").is_dir():
        shutil.copytree(src / "adapters", staging)
    else:
        staging.mkdir(parents=True)
    # The database goes in through the backup API too, so a running reader never sees half a file.
    db_dest.parent.mkdir(parents=True, exist_ok=True)
    source = sqlite3.connect(f"file:{db_src}?mode=ro", uri=True)
    target = sqlite3.connect(str(db_dest))
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    if adapters_dest.exists():
        shutil.rmtree(adapters_dest)
    staging.rename(adapters_dest)
    rows = _adapter_rows(db_dest)
    _rewrite_paths(db_dest, {(r["user_id"], r["version"]): str((adapters_dest / str(r["user_id"]) / Path(r["path"]).name).resolve())
                             for r in rows})
    store = Store(db_dest)
    return {"database": str(db_dest), "adapters": str(adapters_dest), "integrity": store.integrity_check(),
            "users": len(store.list_users()), "adapter_files": len(manifest["adapter_files"])}
