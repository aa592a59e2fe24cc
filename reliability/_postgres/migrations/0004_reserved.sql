-- Placeholder on branch h-waits only: number 0004 belongs to another branch's migration.
-- The lead deletes this file when merging (migrations must be numbered 1..n without a gap).
SELECT 1;
