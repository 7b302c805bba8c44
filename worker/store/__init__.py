"""All ClickHouse access: client factory, migrations, writes and reads."""
