"""What the tests and the benchmarks both run Overread with: a SMART Backend Services client
(``smart_client``), stores loaded through the API (``roles``), a real Orthanc PACS (``orthanc``)
and free ports (``ports``).

Both import them from here, ``bench`` never imports ``tests``, and nothing here imports either
(``tests/test_import_rules.py``). Not part of the product (not packaged, not in the image).
"""
