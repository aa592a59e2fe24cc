-- A placeholder for migration 5, which another branch adds: this branch's 0006 needs
-- the numbers 1..6 without a gap. Deleted when that branch's 0005_*.sql is merged.
SELECT 1;
