"""The embedding tier's store: embedding rows in a Redis Cluster, by table, version and id.

``layout`` says where a row lives (keys, buckets, hash slots), ``registry`` what versions
exist and whether each is complete, ``store`` talks to the cluster (publish, lookup, list,
delete). Used by the model layer when serving and by ``mpsserve embeddings`` when publishing;
it knows nothing of Ray or HTTP. docs/embeddings.md describes the layout.
"""
