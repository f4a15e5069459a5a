-- Stage 1 output per item: the ranked keywords of each of the item's images, per tagger version.
SELECT i.dataset, i.item_id, i.image_idx, k.tagger_version, k.keywords, k.text AS keyword_text
FROM item_images i
JOIN image_keywords k ON k.sha256 = i.sha256
WHERE i.status = 'ok' AND k.status = 'tagged'
