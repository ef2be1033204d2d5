from unlearn.cli import main

main()
