"""`doit audit`: what each package holds and what one decode token moves (docs/audit.md).

    from qwen3build.audit.run import audit_package, run_audit
    from qwen3build.audit.report import format_report

Modules: program (a saved package's ML Program, read-only), traffic (the bytes model),
rules (the rule table), report (the table), macos (Core ML's compute plan), options (the
audit variables), run (the task body), doit_actions (doit glue). Importing this package
is cheap: nothing heavy is imported until an audit runs.
"""
