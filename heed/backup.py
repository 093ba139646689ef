"""`heed backup DEST`: the database through SQLite's backup API plus the active adapters' files."""
from __future__ import annotations

import shutil
from pathlib import Path


def backup(heed, dest: str | Path) -> dict:
    """Copy a consistent snapshot into ``dest`` (a new folder); returns what was copied.

    The database is copied first with the backup API (consistent while the app
    writes); then every adapter version the snapshot names as active is copied.
    An adapter promoted after the snapshot is not referenced by it, so the
    pair stays consistent.
    """
    from .store import Store

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    db_copy = dest / heed.config.db_path.name
    heed.store.backup_to(db_copy)
    snapshot = Store(db_copy)
    copied = []
    with snapshot.db.connect() as db:
        rows = list(db.query("SELECT user_id, version, path FROM adapters WHERE status = 'active'"))
    for row in rows:
        src = Path(row["path"])
        target = dest / "adapters" / str(row["user_id"]) / src.name
        shutil.copytree(src, target)
        copied.append(str(target))
    with snapshot.db.write() as db:
        # Point the copy at its own adapter files so the backup restores anywhere.
        for row in rows:
            db.execute("UPDATE adapters SET path = ? WHERE user_id = ? AND version = ?",
                       [str((dest / "adapters" / str(row["user_id"]) / Path(row["path"]).name).resolve()), row["user_id"], row["version"]])
    return {"database": str(db_copy), "adapters": copied, "integrity": snapshot.integrity_check()}
