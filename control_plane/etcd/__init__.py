"""etcd package."""
