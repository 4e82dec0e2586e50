"""The AI positive cycle (人工智能正循环): from served traffic back to labelled training data.

- :mod:`~livelens.loop.embed`: a Ray Data job that embeds any manifest with a factory backbone
  or the served safety model's backbone, resumable block by block.
- :mod:`~livelens.loop.cluster`: k-means (FAISS) or HDBSCAN over embeddings, with a cluster
  summary: sizes, label mix, medoids, contact sheets, purity and NMI.
- :mod:`~livelens.loop.dedupe`: near-duplicates by perceptual hash and embedding cosine.
- :mod:`~livelens.loop.active`: uncertainty, disagreement and core-set diversity, combined into a
  labelling queue within a budget.
- :mod:`~livelens.loop.capture`: the gateway's bounded, rotating sample store of served frames.
- :mod:`~livelens.loop.simulate`: rounds of active learning against random selection.
"""
