"""Compressed attention ops: RoPE, sparse MQA over window + compressed entries, the indexer's top-k.

`reference` holds the pure-MLX versions that define each op's contract.
"""
