"""DICOM bridge: pynetdicom SCU/SCP, QIDO/WADO client, PACS peers, the image-linking worker."""
