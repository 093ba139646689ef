"""Schema migrations, applied in order; ``PRAGMA user_version`` records how many ran.

Never edit a released migration: append a new one.
"""

MIGRATIONS: list[str] = [
    # v1: the whole loop.
    """
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    failed_logins INTEGER NOT NULL DEFAULT 0,
    locked_until REAL NOT NULL DEFAULT 0,
    seen_adapter_version INTEGER
);
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    title TEXT NOT NULL DEFAULT '',
    adapter_version INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    deleted_at REAL
);
CREATE INDEX conversations_user ON conversations(user_id, updated_at);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    original_content TEXT,
    status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'alternative', 'superseded')),
    replaces_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
    instruction TEXT,
    adapter_version INTEGER,
    created_at REAL NOT NULL
);
CREATE INDEX messages_conversation ON messages(conversation_id, position);
CREATE INDEX messages_user ON messages(user_id);
CREATE TABLE feedback (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    message_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('thumb', 'edit', 'correction', 'comparison', 'rating')),
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    consumed_run_id INTEGER REFERENCES learner_runs(id) ON DELETE SET NULL
);
CREATE INDEX feedback_user_unconsumed ON feedback(user_id, consumed_run_id);
CREATE UNIQUE INDEX feedback_one_thumb ON feedback(user_id, message_id) WHERE kind = 'thumb';
CREATE UNIQUE INDEX feedback_one_rating ON feedback(user_id, conversation_id) WHERE kind = 'rating';
CREATE TABLE learner_runs (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    status TEXT NOT NULL CHECK (status IN ('running', 'promoted', 'rejected', 'failed', 'skipped')),
    trigger TEXT NOT NULL DEFAULT 'manual',
    started_at REAL NOT NULL,
    finished_at REAL,
    seconds REAL,
    n_feedback INTEGER NOT NULL DEFAULT 0,
    n_pairs INTEGER NOT NULL DEFAULT 0,
    candidate_version INTEGER,
    metrics TEXT,
    error TEXT
);
CREATE INDEX learner_runs_user ON learner_runs(user_id, started_at);
CREATE TABLE pairs (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    feedback_id INTEGER REFERENCES feedback(id) ON DELETE CASCADE,
    run_id INTEGER REFERENCES learner_runs(id) ON DELETE SET NULL,
    kind TEXT NOT NULL CHECK (kind IN ('dpo', 'kto', 'sft')),
    source TEXT NOT NULL,
    prompt TEXT NOT NULL,
    chosen TEXT,
    rejected TEXT,
    completion TEXT,
    label INTEGER,
    weight REAL NOT NULL DEFAULT 1.0,
    split TEXT NOT NULL CHECK (split IN ('train', 'heldout')),
    created_at REAL NOT NULL
);
CREATE INDEX pairs_user ON pairs(user_id, split, kind);
CREATE INDEX pairs_feedback ON pairs(feedback_id);
CREATE TABLE adapters (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    path TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'retired', 'rejected', 'deleted')),
    run_id INTEGER REFERENCES learner_runs(id) ON DELETE SET NULL,
    n_feedback INTEGER NOT NULL DEFAULT 0,
    metrics TEXT,
    created_at REAL NOT NULL,
    activated_at REAL,
    UNIQUE (user_id, version)
);
CREATE UNIQUE INDEX adapters_one_active ON adapters(user_id) WHERE status = 'active';
CREATE TABLE leases (
    user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE notes (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    text TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1,
    feedback_id INTEGER REFERENCES feedback(id) ON DELETE SET NULL,
    created_at REAL NOT NULL
);
CREATE INDEX notes_user ON notes(user_id)
""",
    # v2: a password change ends the sessions opened before it (chat_app.session_guard reads this).
    """
ALTER TABLE users ADD COLUMN credentials_changed_at REAL NOT NULL DEFAULT 0
""",
    # v3: whether a pair's chosen answer is one the user endorsed, which the learner's SFT term imitates; the
    # better of two picked answers is only preferred (older stores: every pick was imitated, now none is).
    """
ALTER TABLE pairs ADD COLUMN imitate INTEGER NOT NULL DEFAULT 1;
UPDATE pairs SET imitate = 0 WHERE kind = 'dpo' AND source = 'comparison'
""",
]
