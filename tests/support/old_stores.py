"""Stores written by the previous release (commit d9db5f8), as the SQL that release ran.

Made once by running that release's node (PYTHONPATH pointing at ``git archive d9db5f8``'s
``src``): one message to two recipients, one delivered and one deferred (451), and one
suppression, then ``sqlite3 .iterdump`` of ``spool.sqlite``, ``audit.sqlite`` (hash scheme 1)
and ``suppression.sqlite3``. Tests build the databases from it; no binary database is kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["AUDIT", "SPOOL", "SUPPRESSION", "write_old_stores"]

SPOOL = "\n".join([
    'BEGIN TRANSACTION;',
    'CREATE TABLE bodies (id TEXT PRIMARY KEY, data BLOB NOT NULL);',
    ('INSERT INTO "bodies" VALUES(\'1A247C24B686D0E00000\',X\'52656365697665643'
     'A2066726F6D205B3132372E302E302E315D20283132372E302E302E31290D0A0962792'
     '06D74612E746573742028506F73746C616E652920776974682045534D5450206964203'
     '1413234374332344236383644304530303030303B0D0A095361742C203035204465632'
     '0323032362031393A35303A3435202D303030300D0A582D506F73746C616E652D51756'
     '57565643A20313739363530303234352E3335323B2069643D314132343743323442363'
     '83644304530303030300D0A46726F6D3A206140696E73757265722E746573740D0A546'
     'F3A206E6F77406578616D706C652E636F6D2C206C61746572406578616D706C652E636'
     'F6D0D0A5375626A6563743A206F6C640D0A582D436F7272656C6174696F6E2D49443A2'
     '06F6C642D310D0A4D6573736167652D49443A203C31413234374332344236383644304'
     "53030303030406D74612E746573743E0D0A0D0A48656C6C6F2E0D0A');"),
    'CREATE TABLE messages (',
    ('    id TEXT PRIMARY KEY, cls TEXT NOT NULL, pool TEXT NOT NULL, mail_f'
     'rom TEXT NOT NULL,'),
    '    queued_at REAL NOT NULL, deadline REAL NOT NULL, expire_at REAL NOT NULL,',
    '    priority INTEGER NOT NULL, size INTEGER NOT NULL, envid TEXT, ret TEXT,',
    '    correlation_id TEXT, message_id TEXT, listener TEXT, auth_user TEXT, client TEXT);',
    ('INSERT INTO "messages" VALUES(\'1A247C24B686D0E00000\',\'policy-documents'
     "','critical','a@insurer.test',1.79650024535206103326e+09,1.79650036535"
     "20610332e+09,1.79693224535206103322e+09,0,351,'','','old-1','<1A247C24"
     "B686D0E00000@mta.test>','in','','127.0.0.1');"),
    'CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);',
    'INSERT INTO "meta" VALUES(\'schema_version\',\'1\');',
    'CREATE TABLE paused (pool TEXT NOT NULL, domain TEXT NOT NULL,',
    '    PRIMARY KEY (pool, domain));',
    'CREATE TABLE recipients (',
    ('    msg_id TEXT NOT NULL, idx INTEGER NOT NULL, address TEXT NOT NULL,'
     ' domain TEXT NOT NULL,'),
    '    orcpt TEXT, notify TEXT, state TEXT NOT NULL, attempts INTEGER NOT NULL,',
    ('    next_attempt REAL NOT NULL, last_reply TEXT, PRIMARY KEY (msg_id, '
     'idx)) WITHOUT ROWID;'),
    ('INSERT INTO "recipients" VALUES(\'1A247C24B686D0E00000\',0,\'now@example.'
     "com','example.com','','','delivered',1,0.0,'250 2.0.0 Ok');"),
    ('INSERT INTO "recipients" VALUES(\'1A247C24B686D0E00000\',1,\'later@exampl'
     "e.com','example.com','','','deferred',1,1.79650384029772782323e+09,'45"
     "1 4.3.0 try again later');"),
    'COMMIT;',
])

AUDIT = "\n".join([
    'BEGIN TRANSACTION;',
    'CREATE TABLE audit_cursors (name TEXT PRIMARY KEY, seq INTEGER,',
    '                updated REAL);',
    'CREATE TABLE audit_days (day TEXT PRIMARY KEY, first_seq INTEGER,',
    '                last_seq INTEGER, records INTEGER, anchor BLOB, head BLOB);',
    ('INSERT INTO "audit_days" VALUES(\'2026-12-05\',1,4,4,X\'00000000000000000'
     "00000000000000000000000000000000000000000000000',X'111E0ABE018BCBC1015"
     "282FA6847E4C2CF7D247BD533CA8D5871821C010B097B');"),
    'CREATE TABLE audit_operations (id INTEGER PRIMARY KEY, time REAL,',
    '                action TEXT, pool TEXT, domain TEXT);',
    'CREATE TABLE audit_purges (id INTEGER PRIMARY KEY, time REAL,',
    '                cls TEXT, action TEXT, cutoff REAL, rows INTEGER);',
    ('CREATE TABLE audit_records (seq INTEGER PRIMARY KEY, day TEXT NOT NULL'
     ', prev BLOB NOT NULL, hash BLOB NOT NULL, state INTEGER NOT NULL, nonc'
     'e BLOB, pdigest BLOB, cdigest BLOB, type TEXT, time_logged REAL, time_'
     'queued REAL, orig TEXT, rcpt TEXT, queue_id TEXT, cls TEXT, vmta_pool '
     'TEXT, orcpt TEXT, dsn_action TEXT, dsn_status TEXT, dsn_diag TEXT, dsn'
     '_mta TEXT, bounce_cat TEXT, src_type TEXT, src_mta TEXT, dlv_source_ip'
     ' TEXT, dlv_destination_ip TEXT, dlv_tls_protocol TEXT, dlv_tls_cipher '
     'TEXT, dlv_size INTEGER, vmta TEXT, job_id TEXT, env_id TEXT, correlati'
     'on_id TEXT, message_id TEXT, attempt INTEGER, total_seconds_queued REA'
     'L, listener TEXT, auth_user TEXT, sla REAL);'),
    ('INSERT INTO "audit_records" VALUES(1,\'2026-12-05\',X\'000000000000000000'
     "0000000000000000000000000000000000000000000000',X'54E7ED9D070869FA1A91"
     "A0F637292A08AD71B65868AC3CC5DC14E6C20251FDD7',0,X'6878E74694C1372005E0"
     "A6195D6B4BF8',X'BB9D8A5C14F8E3E6B2BDCFE028DE418699AE73E0C2C266516A27E1"
     "E27B533470',NULL,'r',1.79650024535206103326e+09,1.79650024535206103326"
     "e+09,'a@insurer.test','now@example.com','1A247C24B686D0E00000','policy"
     "-documents','critical','','','','','','','smtp','[127.0.0.1] (127.0.0."
     "1)','','','','',351,'','old-1','','old-1','<1A247C24B686D0E00000@mta.t"
     "est>',0,0.0,'in','',120.0);"),
    ('INSERT INTO "audit_records" VALUES(2,\'2026-12-05\',X\'54E7ED9D070869FA1A'
     "91A0F637292A08AD71B65868AC3CC5DC14E6C20251FDD7',X'AE051D791CC5EA82231A"
     "7E61D4D8941FD44008960EB9F0427247BD19018790BA',0,X'6DD138480E8490674569"
     "2BED5EC9BEC4',X'D8A8E82B813FC8DD1979A84141FC16B6EF92B196E1385C869B1957"
     "9D4C912A6C',NULL,'r',1.79650024535206103326e+09,1.79650024535206103326"
     "e+09,'a@insurer.test','later@example.com','1A247C24B686D0E00000','poli"
     "cy-documents','critical','','','','','','','smtp','[127.0.0.1] (127.0."
     "0.1)','','','','',351,'','old-1','','old-1','<1A247C24B686D0E00000@mta"
     ".test>',0,0.0,'in','',120.0);"),
    ('INSERT INTO "audit_records" VALUES(3,\'2026-12-05\',X\'AE051D791CC5EA8223'
     "1A7E61D4D8941FD44008960EB9F0427247BD19018790BA',X'EDA0C16D48F62C4335C3"
     "191052EFE96CD4E2AF03C415AC47E8F0CD4F638C5329',0,X'AE053573C681647A04F8"
     "1A637FFB4DF5',X'AC7333F3C57F91FEC81D919F5128B54ADCC0E20F34164F32E7AC3A"
     "71F5EA5F4A',NULL,'d',1.79650024537506699563e+09,1.79650024535206103326"
     "e+09,'a@insurer.test','now@example.com','1A247C24B686D0E00000','policy"
     "-documents','critical','','relayed','2.0.0','smtp;250 2.0.0 Ok','dns;1"
     "27.0.0.1 (127.0.0.1)','','smtp','','127.0.0.20','127.0.0.1','','',351,"
     "'tx0.test','old-1','','old-1','<1A247C24B686D0E00000@mta.test>',1,2.30"
     "05962371826171875e-02,'in','',120.0);"),
    ('INSERT INTO "audit_records" VALUES(4,\'2026-12-05\',X\'EDA0C16D48F62C4335'
     "C3191052EFE96CD4E2AF03C415AC47E8F0CD4F638C5329',X'111E0ABE018BCBC10152"
     "82FA6847E4C2CF7D247BD533CA8D5871821C010B097B',0,X'FF4C52ED11455CC5D399"
     "2FC3C2A996EE',X'DE0E205F24D635FDADFFB544D978EB25476FC2B471A0FCF11C2AF3"
     "1BA5312A28',NULL,'t',1.79650024537801623349e+09,1.79650024535206103326"
     "e+09,'a@insurer.test','later@example.com','1A247C24B686D0E00000','poli"
     "cy-documents','critical','','delayed','4.3.0','smtp;451 4.3.0 try agai"
     "n later','dns;127.0.0.1 (127.0.0.1)','policy-related','smtp','','127.0"
     ".0.20','127.0.0.1','','',351,'tx0.test','old-1','','old-1','<1A247C24B"
     "686D0E00000@mta.test>',1,0.0259552001953125,'in','',120.0);"),
    'CREATE TABLE audit_writers (writer TEXT PRIMARY KEY, batch INTEGER,',
    '                last_seq INTEGER, time REAL);',
    ('INSERT INTO "audit_writers" VALUES(\'vm:18739:49450e35205d\',1,4,1.79650'
     '024541941833499e+09);'),
    'CREATE INDEX ar_queue ON audit_records (queue_id);',
    'CREATE INDEX ar_time ON audit_records (time_logged);',
    "CREATE INDEX ar_msgid ON audit_records (message_id) WHERE type = 'r';",
    "CREATE INDEX ar_corr ON audit_records (correlation_id) WHERE type = 'r';",
    "CREATE INDEX ar_envid ON audit_records (env_id) WHERE type = 'r' AND env_id <> '';",
    "CREATE INDEX ar_rcpt ON audit_records (rcpt COLLATE NOCASE) WHERE type = 'r';",
    "CREATE INDEX ar_cls ON audit_records (cls, time_queued) WHERE type = 'r';",
    "CREATE INDEX ar_pool ON audit_records (vmta_pool, time_queued) WHERE type = 'r';",
    'COMMIT;',
])

SUPPRESSION = "\n".join([
    'BEGIN TRANSACTION;',
    'CREATE TABLE suppression (',
    ('            address TEXT NOT NULL, scope TEXT NOT NULL, reason TEXT NO'
     "T NULL DEFAULT '',"),
    "            source TEXT NOT NULL DEFAULT '', created REAL NOT NULL,",
    '            PRIMARY KEY (address, scope)) WITHOUT ROWID;',
    ('INSERT INTO "suppression" VALUES(\'gone@example.com\',\'all\',\'old complai'
     "nt','operator',1790000000.0);"),
    'COMMIT;',
])


def write_old_stores(folder: Path) -> None:
    """``spool.sqlite``, ``audit.sqlite`` and ``suppression.sqlite3`` of the previous release."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, sql in (("spool.sqlite", SPOOL), ("audit.sqlite", AUDIT),
                      ("suppression.sqlite3", SUPPRESSION)):
        conn = sqlite3.connect(folder / name)
        conn.executescript(sql)
        conn.close()
