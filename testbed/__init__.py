"""What the tests and the benchmarks both run Overread with: a SMART Backend Services client
(``smart_client``) and stores loaded through the API (``roles``).

Neither ``tests`` nor ``bench`` imports the other's modules for these: both import them from here,
and nothing here imports either. Not part of the product (not packaged, not in the image).
"""
