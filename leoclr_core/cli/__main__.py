from leoclr_core.cli.app import main

main()
