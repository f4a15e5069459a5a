-- Downstream reads: a run's top-k items per user with the items' titles and categories.
-- e.g. SELECT rank, item_id, title, score FROM recommended_items
--      WHERE run_id = ? AND user_id = ? ORDER BY rank
SELECT r.run_id, r.dataset, r.user_id, r.rank, r.item_id, i.title, i.categories, r.score,
       r.snapshot_id
FROM recommendations r
LEFT JOIN items i ON i.dataset = r.dataset AND i.item_id = r.item_id
