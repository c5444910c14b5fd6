-- Changes the journal writer could not apply however often it tried (a constraint they break,
-- a value the column refuses), set aside so that everything else is written; each one is an
-- alarm for an operator. `change` is the change as JSON: masked rows, sealed messages.
CREATE TABLE journal_dead_letters (
    id     BIGINT PRIMARY KEY,
    node   TEXT NOT NULL,
    at_us  BIGINT NOT NULL,
    error  TEXT NOT NULL,
    change TEXT NOT NULL
);

-- Switch nodes by name: the number each was given (the node part of the ids it makes). A
-- running node holds a lock on its number, so a second process with the same name refuses
-- to start.
CREATE TABLE nodes (
    name          TEXT PRIMARY KEY,
    number        INTEGER NOT NULL UNIQUE,
    registered_us BIGINT NOT NULL,
    started_us    BIGINT NOT NULL
);
