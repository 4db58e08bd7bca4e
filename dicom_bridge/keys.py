"""The attributes Overread asks a PACS for at each Study Root query level (PS3.4 C.6.2.1).

One list serves C-FIND (empty elements as return keys) and QIDO-RS (``includefield``),
so both doors return what the ImagingStudy mapping and the patient match
(``cases.patient_match``: the Patient module's identity, PS3.3 C.7.1.1) need.
"""

STUDY = (
    "StudyInstanceUID",
    "AccessionNumber",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
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
