"""The attributes Overread asks a PACS for at each Study Root query level (PS3.4 C.6.2.1).

One list serves C-FIND (empty elements as return keys) and QIDO-RS (``includefield``),
so both doors return what the ImagingStudy mapping needs.
"""

STUDY = (
    "StudyInstanceUID",
    "AccessionNumber",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "ProcedureCodeSequence",
    "TimezoneOffsetFromUTC",
    "SpecificCharacterSet",
)
SERIES = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "Laterality",
    "SeriesDate",
    "SeriesTime",
    "NumberOfSeriesRelatedInstances",
    "TimezoneOffsetFromUTC",
    "SpecificCharacterSet",
)
INSTANCE = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "ContentLabel",
    "SpecificCharacterSet",
)
