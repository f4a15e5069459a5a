-- Trainer input, text side: per (dataset, item, encoder_version) the ordered stack of sentence
-- vectors (at most 10, sentence_idx order) and its length n.
SELECT s.dataset, s.item_id, e.encoder_version,
       list(e.vector ORDER BY s.sentence_idx) AS vectors,
       count(*)::INTEGER AS n
FROM item_sentences s
JOIN text_embeddings e ON e.text_sha256 = s.text_sha256
WHERE s.sentence_idx < 10
GROUP BY s.dataset, s.item_id, e.encoder_version
