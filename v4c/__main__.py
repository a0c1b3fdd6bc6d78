from v4c.cli import main

main()
