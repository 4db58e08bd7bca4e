"""The second-opinion case: its Task, its workflow, its reports, its images' patient, its routing.

The domain of Overread on top of the generic FHIR store (``fhir_server``): repository hooks, the
``$link-imaging`` operation and the profile rules of second-opinion reports, which ``overread.app``
wires into the store. It imports no bridge (HL7, DICOM): they call it. docs/workflow.md.
"""
