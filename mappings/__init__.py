"""Pure mapping functions: HL7 v2 <-> FHIR, DICOM -> ImagingStudy, ConceptMap translation (no I/O)."""
