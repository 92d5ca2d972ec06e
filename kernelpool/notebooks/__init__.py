"""Notebooks as `.ipynb` files in each user's folder: paths, cells, loading and atomic saves."""
