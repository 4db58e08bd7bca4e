"""The FHIR R4 store (versioned resources, search index, history) and its REST API."""
