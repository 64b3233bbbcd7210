"""The losses across processes, on torch.distributed: vocabulary-parallel cross-entropy and linear
cross-entropy, global-batch contrastive and triplet losses. Reached through the public functions'
`process_group` argument; see _group.py for the agreement check and the gradient convention."""
