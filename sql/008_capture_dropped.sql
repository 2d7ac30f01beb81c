-- Envelopes a capture agent (`planpipe agent`) accepted but never delivered — expired in its
-- Redis last-resort queue (TTL): counted per agent, topic and hour, never silent.
SET search_path TO planpipe;

ALTER TABLE capture_counts ADD COLUMN dropped bigint NOT NULL DEFAULT 0;
