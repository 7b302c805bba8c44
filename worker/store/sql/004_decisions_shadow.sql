-- Shadow (dry-run) decisions are audited like the others, marked so that every reader (key
-- state, blocked keys, the dashboard) can show them apart: nodes refused nothing on them.
ALTER TABLE {db}.decisions ADD COLUMN IF NOT EXISTS shadow Bool DEFAULT false;
