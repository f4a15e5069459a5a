-- Trainer input, image side: per (dataset, item, tagger_version, encoder_version) the ordered
-- stack of keyword-text vectors of the item's ok images (at most 10, image_idx order).
SELECT i.dataset, i.item_id, k.tagger_version, e.encoder_version,
       list(e.vector ORDER BY i.image_idx) AS vectors,
       count(*)::INTEGER AS n
FROM item_images i
JOIN image_keywords k ON k.sha256 = i.sha256 AND k.status = 'tagged'
JOIN text_embeddings e ON e.text_sha256 = sha256(k.text)
WHERE i.status = 'ok' AND i.image_idx < 10
GROUP BY i.dataset, i.item_id, k.tagger_version, e.encoder_version
