"""The FHIR R4 store (versioned resources, search index, history) and its REST API: generic.

It knows no domain: it imports nothing from ``cases``, ``hl7_bridge``, ``dicom_bridge``,
``overread`` or ``mappings``. The application hands it the domain's rules: repository hooks,
instance operations (``operations.register``) and profile rules (``profiles.require``,
``profiles.add_check``).
"""
