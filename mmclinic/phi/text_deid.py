"""Report text de-identification: identifiers become typed placeholders.

Two layers: the identities the archive itself holds for this patient and study
(names, MRN, accession numbers taken from the DICOM header and the reports
table) are removed wherever they appear, and pattern rules catch the rest:

- contact and network identifiers: e-mail, URLs, IP addresses, phone and fax
  numbers (North American, international with ``+``, extensions, after a
  label such as ``Tel:`` or ``pager``), social security numbers;
- record identifiers after their label: after a strong label (MRN, MR#,
  medical record number, patient ID, hospital/NHS number, accession, acc#) the
  next identifier-shaped token (letters and/or digits, ``-`` or ``/`` inside),
  also an all-letter code of four or more capitals; after a weaker label
  (bare ``ID``; case, study, account, order ... followed by #, ID or number)
  the token must hold a digit; bare ``case``/``study`` need three digits;
- dates: numeric (``03/14/2024``, ``03.14.2024``, ``2024/03/14``,
  ``14-Mar-2024``, ``03/2024``, ``on 3/14``) and with month names
  (``January 9``, ``Jan. 9th, 2019``, ``9 January``, ``6th of April 2019``,
  ``February 2019``); the whole expression becomes ``[DATE]``. ``May`` and
  ``March`` count as months only next to a day or a year, never before a unit;
- ages over 89 in every usual spelling (``92-year-old``, ``92 y/o``,
  ``92yo``, ``aged 93``, ``93 years of age``);
- person names: after a title (``Dr.``, ``DR``, ``dr.``, ``Mr.``, ``Mrs.``,
  ``Ms.``, ``Prof.``), after a signature or role label (``Signed by:``,
  ``Electronically signed by``, ``Dictated by``, ``Read by``,
  ``Attending:``, ``Radiologist:``, ``cc:``, ``discussed with`` ...),
  before credentials (``MD``, ``M.D.``, ``DO``, ``RN``, ``NP``, ``PA-C``,
  ``PhD``, ``MBBS``, ``FRCR``, ``FRCPC``), after ``Patient:``/``Name:``,
  in DICOM form ``FAMILY^GIVEN``; in capitals or not, also ``SMITH, JOHN``;
- institutions: one to five capitalised words ending in Hospital(s), Medical
  Center/Centre, Clinic(s), Infirmary, Health System, Institute, University,
  Medical College ..., or ``University/Hospital of ...``, with a following
  ``, City, Country`` tail; places after ``lives in`` and the like;
- street addresses (with unit, city, state and ZIP), P.O. boxes, ZIP codes
  after a state, and any remaining number of six or more digits.

Lower-case generic words ("the hospital", "MRN was verified", "may
represent") and clinical shorthand ("5 mm", "T2", "C5-C6", "L4-5", "PA and
lateral") are left alone. The audit counts replacements per rule and never
records a value. ``RULES`` is the single definition: ``(name, pattern,
replacement)``; a replacement may keep a label with ``\\g<keep>``.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable

# --------------------------------------------------------------------------- building blocks

_SAFE_MONTHS = ("january|february|april|june|july|august|september|october|november|december"
                "|jan|feb|apr|jun|jul|aug|sept|sep|oct|nov|dec")
_MONTH = rf"(?i:{_SAFE_MONTHS}|march|mar|may)(?![A-Za-z])"
# After a day number without a year, "may"/"march"/"mar" are months only when capitalised.
_MONTH_AFTER_DAY = rf"(?:(?i:{_SAFE_MONTHS})|May|MAY|March|MARCH|Mar|MAR)(?![A-Za-z])"
_DAY = r"(?:3[01]|[12]\d|0?[1-9])(?!\d)(?i:st|nd|rd|th)?"
_YEAR = r"(?:19|20)\d\d(?!\d)"
# A number followed by a unit is a measurement, never a day.
_NOT_UNIT = (r"(?![ \t]*(?:%|[x×](?![A-Za-z])|(?i:mm|cm|ml|cc|mg|mcg|kg|g|m|l|mmhg|hu|min|sec|s|hours?|hrs?|days?|weeks?|wks?"
             r"|months?|mos?|years?|yrs?|units?|views?|images?|times|beats|bpm|french|fr|gauge)\b))")
_NUM_END = r"(?![\w/-]|\.\d)"  # not followed by more of a number or word

_NW = r"(?!X{2,}\b)[A-Z][A-Za-z'’\-]*[A-Za-z](?![A-Za-z'’\-])"  # a name word, capitalised or in capitals; not XXXX
# A further name word: not a section header ("Signed by: SMITH FINDINGS: ...") nor, in text written in capitals,
# a small word ("DISCUSSED WITH DR. SMITH AT 14:00").
_NW2 = rf"(?!(?i:at|on|in|to|by|for|and|or|of|the|with|was|is|re|regarding|who|per|via|from)\b){_NW}(?![ \t]*:)"
# Capitalised words that follow "Patient", "discussed with" etc. without being a person's name.
_NOT_NAME = (r"(?!(?i:a|an)[ \t])(?!(?i:the|this|that|these|those|his|her|their|patient|history|position|information|care|age|sex"
             r"|gender|status|identifier|id|mrn|dob|name|preparation|instructions|consent|type|location|room|weight"
             r"|height|radiology|cardiology|surgery|emergency|oncology|neurology|neurosurgery|urology|pulmonary"
             r"|pulmonology|medicine|pediatrics|orthopedics|orthopaedics|hospitalist|nursing|nurse|team|staff|service"
             r"|department|clinic|floor|ward|unit|ed|er|icu|ccu|nicu|picu|pacu|or|ct|mr|mri|us|ir|pacs|on-call"
             r"|resident|attending|physician|provider|primary|referring|ordering|consultant|family|daughter|son"
             r"|wife|husband|mother|father|caregiver|clinician|technologist|doctor|dr|pcp|ob-?gyn|gyn|ent|gi|currently|treated"
             r"|reported|underwent|presented|presents|was|is|has|had|with|without|denies|states)\b)")
_PART = r"(?:(?:van|von|de|der|den|del|della|di|da|du|le|la|ten|ter|bin|al|el)[ \t]+)*"
_PERSON = rf"(?:[A-Z]\.[ \t]*){{0,2}}{_PART}{_NW}(?:[ \t]+[A-Z]\.?(?![A-Za-z]))?(?:[ \t]+{_PART}{_NW2}){{0,2}}"
_PERSON_LF = rf"{_NW},[ \t]*{_NW2}(?:[ \t]+[A-Z]\.?(?![A-Za-z]))?"  # SMITH, JOHN A.
_CRED = r"(?:M\.D\.|MD|Ph\.D\.|PhD|MBBS|MBChB|FRCR|FRCPC|FRCP|FACR|PA-C|DNP|APRN|CRNA)(?![A-Za-z])"
_CRED_COMMA = rf"(?:{_CRED}|D\.O\.|DO|R\.N\.|RN|N\.P\.|NP)(?![A-Za-z])"  # these only after a comma
_CREDS = rf"(?:,[ \t]*{_CRED_COMMA}|[ \t]+{_CRED})(?:,?[ \t]*{_CRED_COMMA})*(?![ \t]*,?[ \t]*\d{{5}})"  # not "Baltimore, MD 21287"

_TOKEN_CHARS = r"[A-Za-z0-9](?:[A-Za-z0-9/-]*[A-Za-z0-9])?(?![A-Za-z0-9])"
_TOK_DIGIT = rf"(?=[A-Za-z/-]*\d){_TOKEN_CHARS}"
_TOK_3DIGITS = rf"(?=(?:[A-Za-z/-]*\d){{3}}){_TOKEN_CHARS}"
_CAPS_CODE = (r"(?!X+\b|(?:NONE|NULL|UNKNOWN|PENDING|AVAILABLE|UNAVAILABLE|MISSING|VERIFIED|REVIEWED|CONFIRMED"
              r"|CHECKED|GIVEN|NUMBER|WITHHELD|REDACTED)\b)[A-Z]{4,}(?:[-/][A-Z0-9]+)*(?![A-Za-z0-9])")
_TOK_STRONG = rf"(?:{_TOK_DIGIT}|{_CAPS_CODE})"
_MORE_DIGITS = r"(?:[ \t]\d{3,}(?![A-Za-z0-9]))*"  # MRN 123 456 789
_NUMBER_WORD = r"(?i:#|number\b|num\b\.?|nbr\b\.?|id\b|identifier\b)"
_SEP = r"[ \t]*[:#=.\-–]?[ \t]*\(?"  # "MRN: x", "MRN - x", "MRN-x", "MRN (x)"
_SEP_MARK = rf"[ \t]*(?:{_NUMBER_WORD})?{_SEP}"  # optional "#", "number", "ID" after a label
_SEP_NO = rf"[ \t]*(?i:no|nr)\b\.?{_SEP}"  # "no." after a label: the token must hold a digit ("MR no acute")

_MRN_LABEL = (r"(?i:MRN|MR(?=[ \t]*(?:#|no\b|nr\b|number\b))|medical[ \t]+record|med[ \t]+rec(?:ord)?\b\.?"
              r"|(?:patient|pt\.?)[ \t]+(?:id\b|identifier\b)|patient(?=[ \t]*(?:#|number\b|no\.?[ \t]*[:#]?[ \t]*\d))"
              r"|(?:hospital|unit|NHS|CHI|chart|health[ \t]+record)(?=[ \t]*(?:#|number\b|no\b|nr\b|id\b)))")
_ACC_LABEL = r"(?i:accession|accn?(?![a-z]))"
_ID_LABEL = (r"(?i:(?:study|case|exam(?:ination)?|subject|specimen|sample|visit|encounter|episode|admission|account"
             r"|acct|member|policy|insurance|subscriber|beneficiary|health[ \t]+plan|licen[cs]e|certificate|serial"
             r"|device|order|requisition|referral|claim|registration|enrol?lment|participant|research|trial|report"
             r"|file|folder|lab|record)[ \t]*(?:#|(?:id|identifier|number|num|nbr|no|nr)\b\.?)|acct\b\.?|FIN\b|CSN\b)")

_FAC = (r"(?=[A-Z])(?i:hospitals?|medical[ \t]+cent(?:er|re)s?|cent(?:er|re)s?|clinics?|polyclinic|infirmary"
        r"|health[ \t]+(?:system|network|trust|service|services|care|centre|center)|healthcare|institute|university"
        r"|medical[ \t]+college|college[ \t]+of[ \t]+medicine|school[ \t]+of[ \t]+medicine|medical[ \t]+school"
        r"|medical[ \t]+group|sanatorium|hospice|nursing[ \t]+home|foundation[ \t]+trust)(?![A-Za-z])")
# Capitalised words that start sentences or describe a hospital without naming it.
_NOT_INST_WORD = (r"(?!(?i:the|a|an|to|from|at|in|on|of|by|for|with|and|or|outside|other|another|this|that|his|her"
                  r"|their|our|local|nearby|same|admitted|transferred|discharged|seen|patient|prior|previous|no|not"
                  r"|any|each|every|referring|sending|receiving|home|pt|dr|mr|mrs|ms)\b)")
_IWORD = rf"{_NOT_INST_WORD}(?:[A-Z][A-Za-z]{{0,2}}\.|[A-Z][A-Za-z'’\-]*[A-Za-z]|[A-Z])"  # St., ST., Mt.
_CONN = r"(?i:of|and|the|for|&|de|du|del|la|le|di|y)"
_IWORDS = rf"{_IWORD}(?:[ \t]+(?:{_CONN}[ \t]+){{0,2}}{_IWORD}){{0,4}}"
_PLACE = r"(?:[A-Z][a-z]+(?:[ \t]+[A-Z][a-z]+){0,2}|[A-Z]{2})(?![A-Za-z])"

_STATES = ("AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC"
           "|ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|PR")
_STREET = (r"(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Court|Ct|Boulevard|Blvd|Parkway|Pkwy|Way|Square|Sq"
           r"|Place|Pl|Terrace|Ter|Circle|Cir|Highway|Hwy|Trail|Crescent|Close|Row|Plaza|Loop)")
_AGE = r"(?:9\d|1[01]\d)"
_AGE_WORDS = (r"(?i:ninety|one[ \t-]+hundred(?:[ \t-]+and)?)(?:[ \t-]+(?i:one|two|three|four|five|six|seven|eight|nine|ten"
              r"|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen))?")
_TOWN = r"[A-Z][a-z]+(?:[ \t]+[A-Z][a-z]+){0,2}"


def _rule(name: str, first: str, pattern: str, replacement: str) -> tuple[str, re.Pattern[str], str]:
    """``(name, compiled pattern, replacement)``; ``first``: what a match starts with (a look-ahead).

    The leading look-ahead changes no match; it lets the engine skip most positions at once
    (the rules run on every report of an archive).
    """
    return name, re.compile(rf"(?={first})(?:{pattern})"), replacement


# Order matters: specific rules before general ones; DICOM names (FAMILY^GIVEN) before other names; names before institutions (whose ", City" tail
# must not swallow a title), institutions before addresses.
RULES: list[tuple[str, re.Pattern[str], str]] = [
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "[EMAIL]"),
    ("url", re.compile(r"\b(?:https?://|www\.)[^\s<>\"]+?(?=[.,;:!?)\]'\"]*(?:\s|$))", re.I), "[URL]"),
    ("ip_address", re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\w.]*\d)"),
     "[IP]"),
    _rule("ssn", r"[\dSs]",
        r"\b(?i:ssn|social[ \t]+security(?:[ \t]+(?:number|no\b\.?))?)[ \t]*[:#]?[ \t]*\d{3}[ -]?\d{2}[ -]?\d{4}(?!\d)"
        r"|(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])", "[SSN]"),
    _rule("phone", r"[\d+(TtPpFfBbCcMmEe]",
        r"(?:(?<![\w+])(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\d)"
        r"|(?<![\w+])\+(?=(?:[ .()-]*\d){8})\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\d)"
        r"|(?<![\w-])\d{3}-\d{4}(?![\d-])(?![ \t]*(?:/|(?i:cells?|copies|units?|mg|ml|iu|u/l|mcg|ng|pg)\b)))"
        r"(?:[ \t]*,?[ \t]*(?i:ext\.?|extension|x)[ \t]*\d{1,6}\b)?"
        r"|(?P<keep>\b(?i:tel|telephone|phone|fax|pager|pgr|beeper|bleep|cell|mobile|mob)\.?[ \t]*(?i:no\b\.?|number|#)?"
        r"[ \t]*[:#]?[ \t]*)\+?(?=(?:[ ().-]*\d){5})\(?\d[\d().\- ]*\d(?![\d-])"
        r"|\b(?i:ext\.?|extension)[ \t]*\d{3,6}\b", r"\g<keep>[PHONE]"),
    _rule("medical_record_number", r"[MmPpHhUuNnCc]",
        rf"\b{_MRN_LABEL}(?:{_SEP_NO}{_TOK_DIGIT}|{_SEP_MARK}{_TOK_STRONG}){_MORE_DIGITS}", "[MRN]"),
    _rule("accession_number", r"[Aa]",
        rf"\b{_ACC_LABEL}(?:{_SEP_NO}{_TOK_DIGIT}|{_SEP_MARK}{_TOK_STRONG}){_MORE_DIGITS}", "[ACCESSION]"),
    _rule("other_identifier", r"\b[A-Za-z]",
        rf"\b{_ID_LABEL}{_SEP}{_TOK_DIGIT}{_MORE_DIGITS}"
        rf"|\b(?:ID|Id|id(?=[ \t]*[:#]))(?![A-Za-z])(?:{_SEP_NO}|{_SEP_MARK}){_TOK_DIGIT}{_MORE_DIGITS}"
        rf"|\b(?i:case|study)[ \t]*[:#]?[ \t]*(?!{_YEAR}(?![A-Za-z0-9/-])){_TOK_3DIGITS}", "[ID]"),
    _rule("date", r"\d|\b(?i:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec|on|dated|since|until|through)",
        # numeric: 03/14/2024, 3-14-24, 03.14.2024; 2024-03-14, 2024/03/14; 03/2024; "on 3/14"
        rf"(?<![\w.,/-])\d{{1,2}}(?P<s1>[/.-])\d{{1,2}}(?P=s1)(?:\d{{4}}|\d{{2}}){_NUM_END}"
        rf"|(?<![\w.,/-]){_YEAR}(?P<s2>[/.-])\d{{1,2}}(?P=s2)\d{{1,2}}{_NUM_END}"
        rf"|(?<![\w.,/-])(?:0?[1-9]|1[0-2])/{_YEAR}{_NUM_END}"
        rf"|(?P<keep>\b(?i:on|dated|since|until|through)[ \t]+)(?:0?[1-9]|1[0-2])/(?:3[01]|[12]\d|0?[1-9]){_NUM_END}"
        # 14-Mar-2024, 14 MAR 24, 14MAR2024, Mar-2024
        rf"|(?<![\w.])\d{{1,2}}[-/. ]?{_MONTH}[-/. ]?(?:\d{{4}}|\d{{2}})(?!\d)"
        rf"|\b{_MONTH}-{_YEAR}"
        # January 9, Jan. 9th, 2019, January 9-12, on March 3
        rf"|\b{_MONTH}\.?[ \t]+(?:the[ \t]+)?{_DAY}(?:[ \t]*(?:-|–|to|through)[ \t]*{_DAY})?{_NOT_UNIT}(?![\d.,]\d)"
        rf"(?:,?[ \t]+(?:of[ \t]+)?{_YEAR})?"
        # 9 January, 6th of April 2019, 9 Jan. 2019; lower-case may/march only with a year
        rf"|(?<![\w.,/-]){_DAY}(?:[ \t]+of)?[ \t]+{_MONTH_AFTER_DAY}\.?(?:,?[ \t]+{_YEAR})?"
        rf"|(?<![\w.,/-]){_DAY}(?:[ \t]+of)?[ \t]+{_MONTH}\.?,?[ \t]+{_YEAR}"
        # February 2019, March of 2019
        rf"|\b{_MONTH}\.?,?[ \t]+(?:of[ \t]+)?{_YEAR}", r"\g<keep>[DATE]"),
    _rule("age_over_89", r"[\dAaNnOo]",
        rf"\b(?:{_AGE}|{_AGE_WORDS})[ \t]*-?[ \t]*(?i:years?|yrs?|y)\.?[ \t]*-?[ \t]*(?i:old|of[ \t]+age)\b"
        rf"|\b{_AGE}[ \t]*-?[ \t]*(?i:y/o|y\.o\.?|yo)(?:[MF](?![A-Za-z]))?(?![A-Za-z])"
        # 92F with ..., 92 M presenting ...: the sex letter only before a history cue (99F may be a temperature)
        rf"|\b{_AGE}[ \t]?[MF](?=[ \t]+(?i:with|w/|presents|presenting|who|s/p|hx|h/o|pmh|admitted)\b)"
        rf"|(?<!\[)\b(?i:aged?|age[ \t]*:)[ \t]*{_AGE}(?![\d.]){_NOT_UNIT}"  # not our own "[AGE 90+]"
        rf"|\b{_AGE}[ \t]*-?[ \t]*(?i:years?|yrs?)\b(?![ \t]+(?i:ago|later|earlier|before|after|prior|since)\b)",
        "[AGE 90+]"),
    # DICOM person names before the other name rules: "Name: SMITH^JOHN" and "Dr. Smith^John" lose both parts
    # (a rule that stops at the caret would leave the given name behind).
    _rule("dicom_person_name", r"[A-Z]",
        r"\b[A-Z][A-Za-z'\-]+\^[A-Z][A-Za-z'\-]*(?:\^[A-Za-z'\-]*){0,3}", "[NAME]"),
    _rule("titled_name", r"[DdPMm]",
        rf"(?<![A-Za-z])(?:(?:Dr|dr|Doctor|doctor|DOCTOR|Prof|Professor)(?:\.[ \t]*|[ \t]+)|DR\.[ \t]*"
        rf"|(?:Mr|Mrs|Ms|Mx|Miss|Mstr|mrs)\.[ \t]*|(?:Mr|Mrs|Ms|Mx|Miss)[ \t]+|(?:MRS|PROF)\.[ \t]*)"
        rf"(?:{_PERSON_LF}|{_PERSON})(?:{_CREDS})?"
        rf"|(?<![A-Za-z])DR[ \t]+[A-Z][A-Z'\-]+(?:[ \t]+[A-Z][A-Z'\-]+)?(?![a-z])", "[NAME]"),
    _rule("signature_name", r"[ECSRDIVTAPOFNecsrdivtapofn]",
        r"(?P<keep>\b(?i:(?:electronically[ \t]+)?(?:co-?)?(?:signed|reported|dictated|read|reviewed|interpreted"
        r"|transcribed|verified|approved|authenticated|prepared|ordered|requested|referred|examined|performed"
        r"|finalized|attested|released|seen)(?:[ \t]+(?:and|&)[ \t]+\w+)?[ \t]+by[ \t]*:?"
        r"|(?:(?:interpreting|reading|supervising|staff)[ \t]+)?(?:attending|radiologist|resident|fellow|technologist|tech"
        r"|sonographer|physician|provider|surgeon"
        r"|consultant|author|pcp|interpreter|clinician|nurse|signed|e-signed|signature|dictating|transcriptionist)"
        r"(?:[ \t]+(?:physician|radiologist|doctor|md))?[ \t]*:"
        r"|(?:referring|ordering|requesting|primary[ \t]+care)(?:[ \t]+(?:physician|provider|doctor|clinician|md))?[ \t]*:?"
        r"|(?:cc|copy[ \t]+to|attn)[ \t]*:"
        r"|(?:discussed|reviewed)[ \t]+with|(?:communicated|called|reported|relayed|conveyed)[ \t]+to|d/w)[ \t]*)"
        rf"{_NOT_NAME}(?:{_PERSON_LF}|{_PERSON})(?:{_CREDS})?", r"\g<keep>[NAME]"),
    _rule("credentialed_name", r"[A-Z]",
        rf"(?<![A-Za-z]){_NOT_NAME}(?:{_PERSON_LF}|{_PERSON})(?:{_CREDS})"
        rf"|(?<![A-Za-z]){_NW}[ \t]+{_NW2}[ \t]+(?:RN|NP)(?![A-Za-z])", "[NAME]"),
    _rule("patient_name", r"[PpNnFfLlGgMm]",
        rf"(?P<keep>\b(?:[Pp]atient|PATIENT|[Pp]t\.?|PT\.?)(?:[ \t]+(?i:name))?[ \t]*:[ \t]*"
        rf"|\b(?i:full|last|first|given|family|middle|maiden|legal|patient'?s)[ \t]+(?i:name)[ \t]*:[ \t]*"
        rf"|(?<![A-Za-z][ \t])(?<![A-Za-z][ \t][ \t])\b(?:[Nn]ame|NAME)[ \t]*:[ \t]*)"
        rf"{_NOT_NAME}(?:{_PERSON_LF}|{_PERSON})"
        # without a colon only a first and last name in title case: "Patient John Smith", not "Patient Treated"
        rf"|(?P<keep2>\b[Pp]atient[ \t]+){_NOT_NAME}[A-Z][a-z'’\-]+(?:[ \t]+[A-Z]\.)?[ \t]+[A-Z][A-Za-z'’\-]*[a-z]"
        rf"(?![A-Za-z])", r"\g<keep>\g<keep2>[NAME]"),
    _rule("institution", r"[A-Z]",
        rf"(?<![A-Za-z]){_IWORDS}[ \t]+{_FAC}(?:[ \t]+(?:(?i:and|&)[ \t]+)?{_FAC})*"
        rf"(?:[ \t]+(?i:of)[ \t]+(?:the[ \t]+)?{_IWORDS})?(?:,[ \t]*{_PLACE}){{0,3}}"
        # "Hospital for Special Surgery", "UNIVERSITY OF IOWA", not "ADMITTED TO HOSPITAL FOR OBSERVATION"
        rf"|(?<![A-Za-z])(?=[A-Z])(?i:university|hospital)[ \t]+(?:of|for|OF)[ \t]+(?:the[ \t]+|THE[ \t]+)?{_IWORDS}"
        rf"(?:,[ \t]*{_PLACE}){{0,3}}", "[INSTITUTION]"),
    _rule("location", r"[LlRrHh]",
        r"(?P<keep>\b(?i:lives|living|resides|residing|resident|residence|home|hometown)[ \t]+(?i:in|at|of|near)[ \t]+)"
        r"(?:the[ \t]+)?[A-Z][a-z]+(?:[ \t]+[A-Z][a-z]+){0,2}(?:,[ \t]*" + _PLACE + r")?", r"\g<keep>[LOCATION]"),
    _rule("address", r"[\dPp]",
        rf"\b\d{{1,5}}[A-Za-z]?[ \t]+(?:[NSEW]\.?[ \t]+)?(?:(?:[A-Z][a-z]+|\d+(?:st|nd|rd|th))[ \t]+){{1,3}}{_STREET}\b\.?"
        r"(?:,?[ \t]*(?i:apt|apartment|suite|ste|unit|#)\.?[ \t]*#?[A-Za-z0-9-]+)?"
        rf"(?:,[ \t]*[A-Z][a-z]+(?:[ \t]+[A-Z][a-z]+){{0,2}}(?:,?[ \t]*(?:{_STATES})\b)?)?(?:,?[ \t]+\d{{5}}(?:-\d{{4}})?\b)?"
        r"|\b(?i:p\.?[ \t]*o\.?[ \t]*box|post[ \t]+office[ \t]+box|pob)[ \t]*#?[ \t]*\d+", "[ADDRESS]"),
    # Millbrook, NY 12508; Boise, Idaho 83702: the town goes with the ZIP code.
    _rule("zip_code", r"\b[A-Z]",
        rf"(?:\b{_TOWN},?[ \t]+)?\b(?:{_STATES})\.?,?[ \t]+\d{{5}}(?:-\d{{4}})?(?![\d-])"
        rf"|\b{_TOWN},[ \t]*[A-Z][a-z]+(?:[ \t]+[A-Z][a-z]+)?[ \t]+\d{{5}}(?:-\d{{4}})?(?![\d-])", "[ADDRESS]"),
    ("long_number", re.compile(r"\b[A-Z]{0,4}\d{6,}\b"), "[ID]"),
]


def _known_pattern(values: Iterable[str], names: Iterable[str], text: str | None = None) -> re.Pattern[str] | None:
    """One pattern for the identities the archive holds.

    ``values`` (IDs, accession numbers, addresses, institutions) match as whole strings;
    ``names`` (DICOM PN values such as ``FAMILY^GIVEN``) also match by component, since
    reports write names in any order. Only whole values and name components are used, so
    common words inside an address or institution ("Old", "General") are never redacted.
    """
    parts = set()
    for v in values:
        v = (v or "").strip()
        if len(v) >= 3:
            parts.add(re.escape(v))
    for n in names:
        n = (n or "").strip()
        if len(n) >= 3:
            parts.add(re.escape(n))
        for piece in re.split(r"[\^\s,]+", n):
            if len(piece) >= 3 and not piece.isdigit():
                parts.add(re.escape(piece))
    if text is not None:  # only values that occur at all: the pattern stays small and quick to build
        lower = text.lower()
        parts = {p for p in parts if re.sub(r"\\(.)", r"\1", p).lower() in lower}
    if not parts:
        return None
    return re.compile(r"\b(?:" + "|".join(sorted(parts, key=len, reverse=True)) + r")\b", re.I)


def deidentify_text(text: str, known: Iterable[str] = (), audit: collections.Counter[str] | None = None,
                    known_names: Iterable[str] = ()) -> str:
    """Replace identifiers in ``text`` by typed placeholders; count replacements in ``audit``.

    ``known``: whole identifier values of this patient/study; ``known_names``: person names.
    """
    audit = audit if audit is not None else collections.Counter()
    for name, rx, placeholder in RULES:
        text, n = rx.subn(placeholder, text)
        audit[name] += n
    pattern = _known_pattern(known, known_names, text)
    if pattern is not None:
        text, n = pattern.subn("[REDACTED]", text)
        audit["known_identity"] += n
    return text


_TOKEN = re.compile(r"[^\W_]+")  # runs of letters and digits, in any script
_PLACEHOLDERS = frozenset({"unknown", "anonymous", "anonymized", "anonymised", "anon", "none", "null", "patient",
                           "name", "test", "tech", "removed", "redacted", "deidentified"})
"""Values anonymising exports put in identifying tags: not identities (redacting them would cut
ordinary words out of paths and messages)."""


class KnownIdentities:
    """The identities an archive holds, found again in file paths and messages about files.

    Paths name files the way exports do (``SMITH_JOHN_12345678/1.dcm``), where word-boundary
    patterns do not apply (``_`` is a word character): values and names are matched as whole runs
    of letters and digits, case-insensitively. IDs and other values count when their letters and
    digits total four or more (six or more when only digits); person names (``FAMILY^GIVEN``) also by component of three letters
    or more, as in :func:`deidentify_text`. Only the values are kept, never where they came from.
    """

    def __init__(self) -> None:
        self._index: dict[str, set[tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._index.values())

    def _add_tokens(self, tokens: tuple[str, ...]) -> None:
        if tokens:
            self._index.setdefault(tokens[0], set()).add(tokens)

    def add(self, values: Iterable[str], names: Iterable[str] = ()) -> None:
        """``values``: whole identifiers (IDs, accession numbers, addresses); ``names``: person names.

        Each is also kept with its punctuation dropped (``MRN-004512`` as ``mrn004512``,
        ``O'BRIEN`` as ``obrien``), and an identifier's runs of six digits or more alone (``004512``
        of ``MRN-004512``), as paths spell them. Placeholders (``UNKNOWN``, ``ANONYMOUS``) are not
        identities."""
        for v in values:
            tokens = tuple(t.lower() for t in _TOKEN.findall(v or ""))
            joined = "".join(tokens)
            if joined in _PLACEHOLDERS:
                continue
            if len(joined) >= (6 if joined.isdigit() else 4):  # short numbers are also counters, sizes, lines
                self._add_tokens(tokens)
                if len(tokens) > 1:
                    self._add_tokens((joined,))
            for run in re.findall(r"\d{6,}", joined):
                self._add_tokens((run,))
        for n in names:
            tokens = tuple(t.lower() for t in _TOKEN.findall(n or ""))
            if len(n or "") >= 3 and "".join(tokens) not in _PLACEHOLDERS:
                self._add_tokens(tokens)
                if len(tokens) > 1:
                    self._add_tokens(("".join(tokens),))  # SMITHJOHN
            for piece in re.split(r"[\^\s,]+", n or ""):
                tokens = tuple(t.lower() for t in _TOKEN.findall(piece))
                if len(piece) >= 3 and not piece.isdigit() and "".join(tokens) not in _PLACEHOLDERS:
                    self._add_tokens(tokens)
                    if len(tokens) > 1:
                        self._add_tokens(("".join(tokens),))  # O'BRIEN as obrien

    def redact(self, text: str) -> str:
        """``text`` with every known identity replaced by ``[REDACTED]``."""
        if not self._index or not text:
            return text
        spans = [(m.start(), m.end(), m.group().lower()) for m in _TOKEN.finditer(text)]
        out, last, i = [], 0, 0
        while i < len(spans):
            best = 0
            for cand in self._index.get(spans[i][2], ()):
                n = len(cand)
                if n > best and tuple(s[2] for s in spans[i:i + n]) == cand:
                    best = n
            if best:
                out += [text[last:spans[i][0]], "[REDACTED]"]
                last = spans[i + best - 1][1]
                i += best
            else:
                i += 1
        return "".join(out) + text[last:]
