"""The zoo's library: cards, architectures, datasets, composition methods and the store."""
