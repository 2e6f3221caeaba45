-- Session tables of the Resonance IM contract (PostgreSQL dialect: no
-- TINYINT or UNSIGNED, so SMALLINT and BIGINT).
CREATE TABLE IF NOT EXISTS t_session (
    session_id     VARCHAR(64)  NOT NULL PRIMARY KEY,
    type           SMALLINT     NOT NULL DEFAULT 1,
    name           VARCHAR(128) NOT NULL DEFAULT '',
    owner_username VARCHAR(64)  NOT NULL DEFAULT '',
    max_seq_id     BIGINT       NOT NULL DEFAULT 0,
    created_at     TIMESTAMPTZ  NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at     TIMESTAMPTZ  NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS t_session_member (
    session_id    VARCHAR(64) NOT NULL,
    username      VARCHAR(64) NOT NULL,
    role          SMALLINT    NOT NULL DEFAULT 0,
    last_read_seq BIGINT      NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (session_id, username)
);

CREATE INDEX IF NOT EXISTS idx_user ON t_session_member (username);
