-- A placeholder for migration 4, which another branch adds: this branch's 0006 needs
-- the numbers 1..6 without a gap. Deleted when that branch's 0004_*.sql is merged.
SELECT 1;
