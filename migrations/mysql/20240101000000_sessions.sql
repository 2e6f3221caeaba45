-- Session tables of the Resonance IM contract (MySQL / MariaDB dialect).
CREATE TABLE IF NOT EXISTS t_session (
    session_id     VARCHAR(64)  NOT NULL,
    type           TINYINT      NOT NULL DEFAULT 1,
    name           VARCHAR(128) NOT NULL DEFAULT '',
    owner_username VARCHAR(64)  NOT NULL DEFAULT '',
    max_seq_id     BIGINT UNSIGNED NOT NULL DEFAULT 0,
    created_at     TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at     TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    PRIMARY KEY (session_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS t_session_member (
    session_id    VARCHAR(64) NOT NULL,
    username      VARCHAR(64) NOT NULL,
    role          TINYINT     NOT NULL DEFAULT 0,
    last_read_seq BIGINT UNSIGNED NOT NULL DEFAULT 0,
    created_at    TIMESTAMP   NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at    TIMESTAMP   NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    PRIMARY KEY (session_id, username),
    INDEX idx_user (username)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
